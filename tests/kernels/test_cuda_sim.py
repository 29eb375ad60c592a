"""The "cuda" backend's kernels on the CPU: csrc/cuda compiled as C++ against the simulation header, every global
access bounds-checked, against the float64 reference (no GPU needed). Availability: test_cuda.py; the same
kernels on a GPU: test_cuda_gpu.py.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fod_kernels import backend_cuda
from fod_kernels._custom_op import register_backend
from helpers import assert_fa_rule, make_branch, opcheck_strided, upstream, values_and_grads
from fod_kernels.reference import correlation_reference
from test_mask_memory_kernels import masked_case


# ---------------------------------------------------------------------------------------------
# The CUDA kernels on the CPU: csrc/cuda/sim_cpu.cpp compiles the extension's own sources as C++
# against csrc/cuda/sim_cpu.cuh (blocks of std::threads, barriers for __syncthreads and the warp
# shuffles, bounds-checked global memory). platform.cuh's launch and shared-memory macros are the
# only difference from the GPU build, so this runs the real kernel code (tiling, masks, padding,
# strides, the shared-memory batch loop, fused branches) without a GPU, and every global load and
# store is checked against the tensor it addresses.
# ---------------------------------------------------------------------------------------------
CSRC = Path(__file__).resolve().parents[2] / "csrc"


def _load_sim(name, source, flags=("-O1",)):
    from torch.utils.cpp_extension import load

    return load(name=name, sources=[str(source)], extra_include_paths=[str(source.parents[1])],
                extra_cflags=[*flags, "-pthread"], extra_ldflags=["-pthread"])


def _sim_op(mod, name="cuda_sim"):
    fwd = lambda qs, ks, vs, sigmas, rows, cols, scale, eps, need, masks=None: mod.forward(  # noqa: E731
        qs, ks, vs, sigmas, rows, cols, scale, eps, list(need))

    def bwd(g_outs, g_kl_attns, g_kl_priors, g_ents, dfulls, qs, ks, vs, sigmas, lses, rows, cols, scale, eps,
            masks=None):
        return mod.backward(g_outs, g_kl_attns, g_kl_priors, g_ents, dfulls, qs, ks, vs, sigmas, lses, rows, cols,
                            scale, eps)

    return register_backend(name, fwd, bwd)


@pytest.fixture(scope="module")
def sim_mod():
    return _load_sim("fod_kernels_cuda_sim", CSRC / "cuda" / "sim_cpu.cpp")


@pytest.fixture(scope="module")
def sim_run(sim_mod):
    return _sim_op(sim_mod)


def _sim_fn(run, grid, eps, need=True):
    def fn(q, k, v, s):
        # sigma in float32 whatever q's dtype: the kernels compute the prior in float32
        out, kl_attn, kl_prior, ent = run([(q, k, v, s.float())], *grid, q.shape[-1] ** -0.5, eps, [need])[0]
        if not need:
            z = out.new_zeros(out.shape[:3], dtype=torch.float32)
            return out, z, z, z
        return out, kl_attn, kl_prior, ent
    return fn


def _sim_check(run, branch, grid, eps, dtype, names=("out", "kl", "ent", "dq", "dk", "dv", "dsigma"), need=True,
               label=""):
    ups = upstream(branch[0], 1)
    if not need:
        ups = (ups[0], *(torch.zeros_like(u) for u in ups[1:]))
    ref = lambda q, k, v, s: correlation_reference(q, k, v, s, grid, eps=eps)  # noqa: E731
    ref64 = values_and_grads(ref, tuple(t.double() for t in branch), ups)
    ref_lp = values_and_grads(ref, branch, ups)
    got = values_and_grads(_sim_fn(run, grid, eps, need), branch, ups)
    if need:
        assert torch.equal(got["kl"], got["kl_prior"])
    assert_fa_rule(got, ref_lp, ref64, dtype, names=names, label=label)
    return got


SIM_CASES = [  # grid, D, B, shared, eps, dtype, sigma range
    ((8, 8), 8, 2, False, 1e-4, torch.float32, (0.1, 2.0)),
    ((13, 10), 40, 2, True, 0.0, torch.float32, (1e-5, 2.0)),  # 3 query tiles, the last partial
    ((5, 21), 100, 3, True, 1e-4, torch.float32, (0.1, 2.0)),  # D bucket 128: 32-key backward tiles
    ((1, 70), 17, 1, False, 0.0, torch.float32, (1e-5, 1e-3)),
    ((9, 9), 33, 2, False, 1e-4, torch.bfloat16, (0.1, 2.0)),
    ((7, 11), 64, 2, True, 1e-4, torch.float16, (0.5, 2.0)),
]


@pytest.mark.slow
@pytest.mark.parametrize("grid,D,B,shared,eps,dtype,sig", SIM_CASES)
def test_sim_kernels_match_float64(sim_run, grid, D, B, shared, eps, dtype, sig):
    L = grid[0] * grid[1]
    br = make_branch(B, 2, L, D, 1 if shared else B, dtype=dtype, seed=L + D, sigma_lo=sig[0], sigma_hi=sig[1])
    _sim_check(sim_run, br, grid, eps, dtype, label=f"sim grid={grid} D={D} shared={shared} eps={eps} {dtype}")


@pytest.mark.slow
def test_sim_inference_path(sim_run):
    grid, D = (10, 13), 24
    br = make_branch(2, 1, 130, D, 1, seed=3)
    got = _sim_check(sim_run, br, grid, 1e-4, torch.float32, names=("out", "dq", "dk", "dv"), need=False)
    assert torch.count_nonzero(got["dsigma"]) == 0
    full = sim_run([br], *grid, D ** -0.5, 1e-4, [True])[0]
    lean = sim_run([br], *grid, D ** -0.5, 1e-4, [False])[0]
    assert torch.equal(full[0], lean[0]) and lean[1:] == (None, None, None)


@pytest.mark.slow
def test_sim_fused_branches_equal_single_calls(sim_run):
    grid, D, B = (10, 13), 24, 2
    intra = make_branch(B, 2, 130, D, B, seed=4)
    inter = make_branch(B, 2, 130, D, 1, seed=5, sigma_lo=1e-5)
    scale = D ** -0.5
    leaves = [t.clone().requires_grad_(True) for t in (*intra, *inter)]
    fused = sim_run([leaves[:4], leaves[4:]], *grid, scale, 1e-4, [True, True])
    ups = [upstream(intra[0], 6), upstream(inter[0], 7)]
    loss = sum((o.double() * g).sum() + (a_.double() * a).sum() + (b_.double() * b).sum() + (e_.double() * e).sum()
               for (o, a_, b_, e_), (g, a, b, e) in zip(fused, ups))
    grads = torch.autograd.grad(loss, leaves)
    for i, br in enumerate((intra, inter)):
        single = values_and_grads(_sim_fn(sim_run, grid, 1e-4), br, ups[i])
        for j, n in enumerate(("out", "kl", "kl_prior", "ent")):
            assert torch.equal(single[n], fused[i][j].detach().double()), (i, n)
        for j, n in enumerate(("dq", "dk", "dv", "dsigma")):
            assert torch.equal(single[n], grads[4 * i + j].double()), (i, n)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sim_low_precision_inputs_read_float32_sigma(sim_run, dtype):
    """bf16/fp16 q, k, v with float32 sigma: the kernels read sigma in float32 (the prior and dsigma are
    float32): K matches the float64 reference computed from the same (exactly upcast) inputs to float32
    accuracy, which sigma rounded to the input dtype (as the cuda backend did before) misses by far."""
    grid, D = (5, 6), 16
    q, k, v, s = make_branch(2, 2, 30, D, 2, dtype=torch.float32, seed=8, sigma_lo=0.3, sigma_hi=1.5)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    s.requires_grad_(True)
    ref = correlation_reference(q.double(), k.double(), v.double(), s.detach().double(), grid)[1]
    got = sim_run([(q, k, v, s)], *grid, D ** -0.5, 1e-4, [True])[0]
    rounded = sim_run([(q, k, v, s.detach().to(dtype).float())], *grid, D ** -0.5, 1e-4, [True])[0]
    err, err_rounded = ((x[1].double() - ref).abs().max().item() for x in (got, rounded))
    assert err < 1e-4 < err_rounded, (err, err_rounded)
    (ds,) = torch.autograd.grad(got[2].sum(), s)
    assert ds.dtype == torch.float32 and torch.isfinite(ds).all() and ds.abs().max() > 0


@pytest.mark.parametrize("needs", ["s", "v", "q", "qkvs"])
def test_sim_requires_grad_follows_the_formulas(sim_run, needs):
    """As every backend (test_meta_and_grad_rule.py): out needs q, k or v; kl_attn and entropy q or k; kl_prior
    sigma. Before, the wrapper marked every result as requiring grad (with a zero gradient) when any input did."""
    from test_meta_and_grad_rule import _rule
    flags = [c in needs for c in "qkvs"]
    br = [t.detach().requires_grad_(n) for t, n in zip(make_branch(1, 2, 12, 8, 1), flags)]
    res = sim_run([br], 3, 4, 8 ** -0.5, 1e-4, [True])[0]
    assert tuple(t.requires_grad for t in res) == _rule(*flags)


@pytest.mark.slow
@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_sim_sigma_below_minimum(sim_run, eps):
    """The CUDA kernels read max(sigma, SIGMA_MIN) and give dsigma = 0 below it (see test_sigma_min.py)."""
    from test_sigma_min import check_tiny_sigma, tiny_sigma_branch
    check_tiny_sigma(sim_run, tiny_sigma_branch(), eps)


def test_sim_core_is_cpp17_and_catches_out_of_bounds(tmp_path):
    """sim_cpu.cuh and the kernels build as C++17 (torch 2.11's standard; no std::barrier), the simulated
    barriers and shuffles work, and the checked global memory catches a read one row past an input."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "sim_cpp17_check"
    src = Path(__file__).with_name("sim_cpp17_check.cpp")
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-pthread", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
                            "-Werror", f"-I{CSRC}", str(src), "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60).stdout
    assert "in-bounds copy and shuffle sums: ok" in out, out
    # the row one past the end is bytes 140..167 of the 140-byte input; the simulated threads run concurrently,
    # so whichever of its 7 reads comes first is the one reported
    caught = re.search(r"out-of-bounds read: caught: out-of-bounds global memory access in kernel copy_rows "
                       r"\(block 0, thread \d+\): 4 bytes at byte offset (\d+) of a tensor argument of 140 bytes", out)
    assert caught and 140 <= int(caught.group(1)) < 168 and int(caught.group(1)) % 4 == 0, out


def _bhld(t, strided):
    """t, or the same values as a (B, L, H, D)-memory view transposed to (B, H, L, D) (the module's layout)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2) if strided else t


@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(grid=st.sampled_from([(1, 1), (3, 5), (1, 17), (9, 2), (5, 7)]), B=st.integers(1, 3), H=st.integers(1, 2),
       D=st.sampled_from([1, 16, 40, 70]), shared=st.lists(st.booleans(), min_size=1, max_size=2),
       need=st.tuples(st.booleans(), st.booleans()), dtype=st.sampled_from([torch.float32, torch.float16]),
       strided=st.booleans(), seed=st.integers(0, 99))
def test_sim_every_access_in_bounds(sim_run, grid, B, H, D, shared, need, dtype, strided, seed):
    """Memory safety of the CUDA kernels: every global load and store of the simulation is checked against
    the tensor it addresses (an access outside raises), over batch-shared and per-image memories, one branch
    or two fused, grids that are no tile multiple, every head-dim bucket, with and without statistics,
    forward and backward, contiguous and strided inputs."""
    L = grid[0] * grid[1]
    leaves = []
    for i, sh in enumerate(shared):
        br = make_branch(B, H, L, D, 1 if sh else B, dtype=dtype, seed=seed + i, sigma_lo=0.5)
        br = (*br[:3], br[3].float())  # sigma is float32 for every input dtype
        leaves.append([_bhld(t, strided).detach().requires_grad_(True) for t in br])
    res = sim_run(leaves, *grid, D ** -0.5, 1e-4, list(need[:len(shared)]))
    loss = 0
    for out, kl_attn, kl_prior, ent in res:
        loss = loss + out.float().square().sum()
        if kl_attn is not None:
            loss = loss + (kl_attn - kl_prior + 0.5 * ent).sum()
    loss.backward()
    for lv in leaves:
        for t in lv:
            assert torch.isfinite(t.grad).all()


@pytest.fixture(scope="module")
def sim_backend(sim_mod):
    """fod_kernels.backend_cuda's own fwd/bwd (its Python layer) over the simulated extension, recording the
    data pointers of the tensors handed to the extension."""
    seen = set()

    class Recording:
        def forward(self, *args):
            seen.update(t.data_ptr() for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor))
            return sim_mod.forward(*args)

        def backward(self, *args):
            seen.update(t.data_ptr() for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor))
            return sim_mod.backward(*args)

    saved = backend_cuda._ext_mod
    backend_cuda._ext_mod = Recording
    try:
        yield register_backend("cuda_sim_backend", backend_cuda.fwd, backend_cuda.bwd), seen
    finally:
        backend_cuda._ext_mod = saved


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
def test_sim_strided_inputs_bitwise_and_in_place(sim_backend, shared):
    """(B, L, H, D) projections viewed as (B, H, L, D): the cuda backend hands them to its kernels without a
    copy, and the results are bitwise those of contiguous inputs."""
    run, seen = sim_backend
    B, H, grid, D = 2, 2, (3, 5), 40
    L = grid[0] * grid[1]
    br = make_branch(B, H, L, D, 1 if shared else B, seed=3)
    ups = upstream(br[0], 4)

    def once(strided):
        leaves = [_bhld(t, strided).detach().requires_grad_(True) for t in br]
        (out, kl_attn, kl_prior, ent), = run([leaves], *grid, D ** -0.5, 1e-4, [True])
        g_out = _bhld(ups[0].float(), strided)
        grads = torch.autograd.grad([out, kl_attn, kl_prior, ent], leaves, [g_out, *(u.float() for u in ups[1:])])
        return [out, kl_attn, ent, *grads], leaves, g_out

    ref, _, _ = once(False)
    seen.clear()
    got, leaves, g_out = once(True)
    assert not leaves[0].is_contiguous() and not leaves[1].is_contiguous()
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    assert {t.data_ptr() for t in leaves} | {g_out.data_ptr()} <= seen, "a strided input was copied"
    assert all(t.is_contiguous() for t in got)  # outputs are contiguous, as the op's fake says
    opcheck_strided(run)


def _sim_masked_fn(run, grid, eps, mask):
    def fn(q, k, v, s):
        (out, kl_attn, kl_prior, ent), = run([(q, k, v, s.float())], *grid, q.shape[-1] ** -0.5, eps, [True], [mask])
        return out, kl_attn, kl_prior, ent
    return fn


def _sim_masked_check(run, branch, grid, eps, mask, dtype, label):
    """Values and all four gradients of the simulated kernels (through backend_cuda's Python layer) against
    the float64 reference, FlashAttention's rule; a key masked for every query that reads it gets exactly
    zero dk, dv."""
    ups = upstream(branch[0], 3)
    ref = lambda q, k, v, s: correlation_reference(q, k, v, s, grid, eps=eps, key_padding_mask=mask)  # noqa: E731
    ref64 = values_and_grads(ref, tuple(t.double() for t in branch), ups)
    ref_lp = values_and_grads(ref, tuple(t.to(dtype) for t in branch), ups)
    got = values_and_grads(_sim_masked_fn(run, grid, eps, mask), tuple(t.to(dtype) for t in branch), ups)
    assert torch.equal(got["kl"], got["kl_prior"])
    assert_fa_rule(got, ref_lp, ref64, dtype, label=label)
    if mask is not None:
        B, Bk = branch[0].shape[0], branch[1].shape[0]
        full = mask.expand(B, -1)
        km = (full if Bk == B else full.all(0, keepdim=True))[:, None, :, None]
        for n in ("dk", "dv"):
            assert (got[n] * km).abs().max() == 0, n


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(grid=st.sampled_from([(1, 5), (3, 4), (5, 5), (9, 9), (2, 37)]), B=st.integers(1, 3), H=st.integers(1, 2),
       D=st.sampled_from([16, 40, 70]), m=st.integers(1, 3), shared=st.booleans(),
       mask_kind=st.sampled_from(["none", "shared", "per_batch", "expanded"]), eps=st.sampled_from([1e-4, 0.0]),
       low=st.booleans(), sigma=st.sampled_from([(0.1, 2.0), (1e-5, 2.0), (0.5, 3.0)]), seed=st.integers(0, 2 ** 16))
@example(grid=(9, 9), B=2, H=2, D=16, m=3, shared=True, mask_kind="per_batch", eps=0.0, low=False, sigma=(0.1, 2.0),
         seed=0)  # S = 243: four key tiles, the last partial; per-batch masks in the batch-shared dk/dv loop
@example(grid=(2, 37), B=2, H=1, D=70, m=2, shared=False, mask_kind="none", eps=1e-4, low=True, sigma=(0.5, 3.0),
         seed=1)  # S = 2L, no mask; D bucket 128 (32-key backward tiles)
@example(grid=(5, 5), B=3, H=1, D=40, m=1, shared=True, mask_kind="expanded", eps=1e-4, low=False,
         sigma=(1e-5, 2.0), seed=2)  # S = L with a mask, widths down to 1e-5 (a masked own cell)
def test_sim_masked_multi_image_matches_reference(sim_backend, grid, B, H, D, m, shared, mask_kind, eps, low, sigma,
                                                  seed):
    """The cuda kernels' extended variant: key_padding_mask (none, (1, S), (B, S), (1, S) expanded) and
    S = m * L keys, Bk = 1 or B, every head-dim bucket, float32 and bfloat16, against the float64 reference."""
    run, _ = sim_backend
    branch, mask = masked_case(grid, B, H, D, m, shared, mask_kind, seed, sigma)
    dtype = torch.bfloat16 if low else torch.float32
    _sim_masked_check(run, branch, grid, eps, mask, dtype,
                      f"sim grid={grid} B={B} D={D} m={m} shared={shared} mask={mask_kind} eps={eps} {dtype}")


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
def test_sim_fully_masked_key_tiles(sim_backend, shared):
    """Whole 64-key tiles masked (the first, so the online softmax starts at -inf, and one in the middle), per
    batch, with S = 3L: the tiles that hold no kept key add nothing and produce no NaN."""
    run, _ = sim_backend
    grid, B, m = (9, 9), 2, 3
    branch, _ = masked_case(grid, B, 2, 16, m, shared, "none", 5)
    mask = torch.zeros(B, m * 81, dtype=torch.bool)
    mask[0, :128] = True  # key tiles 0 and 1
    mask[1, 64:192] = True  # key tiles 1 and 2
    mask[1, 200] = True
    _sim_masked_check(run, branch, grid, 1e-4, mask, torch.float32, f"sim fully masked tiles shared={shared}")


@pytest.mark.slow
def test_sim_fused_masked_branches_equal_single_calls(sim_backend):
    """Both branches in one launch with different S (L and 3L: different key-tile counts in dk/dv) and
    different masks = two single-branch calls, bitwise."""
    run, _ = sim_backend
    grid = (9, 9)
    (q, k, v, s), mi = masked_case(grid, 2, 2, 16, 1, False, "per_batch", 5)
    (qr, kr, vr, sr), me = masked_case(grid, 2, 2, 16, 3, True, "shared", 6)
    leaves = [t.float().clone().requires_grad_(True) for t in (q, k, v, s, qr, kr, vr, sr)]
    fused = run([leaves[:4], leaves[4:]], *grid, 0.25, 1e-4, [True, True], [mi, me])
    ups = [upstream(q, 7), upstream(qr, 8)]
    loss = sum((o.double() * g).sum() + (a_.double() * a).sum() + (b_.double() * b).sum() + (e_.double() * e).sum()
               for (o, a_, b_, e_), (g, a, b, e) in zip(fused, ups))
    grads = torch.autograd.grad(loss, leaves)
    for i, (br, mask) in enumerate((((q, k, v, s), mi), ((qr, kr, vr, sr), me))):
        single = values_and_grads(_sim_masked_fn(run, grid, 1e-4, mask), tuple(t.float() for t in br), ups[i])
        for j, n in enumerate(("out", "kl", "kl_prior", "ent")):
            assert torch.equal(single[n], fused[i][j].detach().double()), (i, n)
        for j, n in enumerate(("dq", "dk", "dv", "dsigma")):
            assert torch.equal(single[n], grads[4 * i + j].double()), (i, n)


@pytest.mark.slow
def test_sim_masked_opcheck(sim_backend):
    run, _ = sim_backend
    opcheck_strided(run, masked=True)
