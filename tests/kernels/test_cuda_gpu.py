"""The "cuda" backend on a GPU (marked `gpu`, skipped without one): values and all four gradients against the
float64 reference through helpers.check_backend (FlashAttention's rule). Availability: test_cuda.py; the
kernels in their CPU simulation: test_cuda_sim.py.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fod_kernels as fk
from fod_kernels import backend_cuda
from helpers import assert_backends_agree, assert_fa_rule, backend_fn, check_backend, make_branch, \
    reference_fn, upstream, values_and_grads
from fod_kernels.reference import correlation_reference

gpu = pytest.mark.gpu

GRIDS = {256: [(16, 16), (8, 32)], 1024: [(32, 32), (16, 64)], 4096: [(64, 64)]}
ODD_GRIDS = [(15, 17), (1, 37), (37, 1), (7, 13), (31, 33), (3, 5), (1, 1)]
SIGMAS = [(0.1, 2.0), (1e-5, 1e-3), (1e-5, 2.0), (1.0, 2.0)]


# ---------------------------------------------------------------------------------------------
# GPU tests.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")  # module scope: hypothesis tests may not take function-scoped fixtures
def cuda_backend():
    ok, why = backend_cuda.status()
    if not ok:
        pytest.fail(f"the cuda backend cannot run on this CUDA machine: {why}")
    return "cuda"


def _branch(B, H, L, D, Bk, dtype, seed, sig=(0.1, 2.0), logit=1.0):
    return make_branch(B, H, L, D, Bk, dtype=dtype, device="cuda", seed=seed, sigma_lo=sig[0], sigma_hi=sig[1],
                       logit_scale=logit)


@gpu
@settings(max_examples=30, deadline=None)
@given(L=st.sampled_from(sorted(GRIDS)), data=st.data(), D=st.sampled_from([32, 64]), shared=st.booleans(),
       eps=st.sampled_from([1e-4, 0.0]), sig=st.sampled_from(SIGMAS), logit=st.sampled_from([1.0, 4.0]),
       seed=st.integers(0, 2**16))
def test_float32_matches_float64(cuda_backend, L, data, D, shared, eps, sig, logit, seed):
    grid = data.draw(st.sampled_from(GRIDS[L]))
    B, H = (2, 2) if L < 4096 else (1, 2)
    br = _branch(B, H, L, D, 1 if shared else B, torch.float32, seed, sig, logit)
    check_backend(cuda_backend, br, grid, eps, dtype=torch.float32, seed=seed + 1,
                  label=f"L={L} grid={grid} D={D} shared={shared} eps={eps} sigma={sig} logit={logit}")


@gpu
@settings(max_examples=30, deadline=None)
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16]), L=st.sampled_from([256, 1024]), data=st.data(),
       D=st.sampled_from([32, 64]), shared=st.booleans(), eps=st.sampled_from([1e-4, 0.0]),
       logit=st.sampled_from([1.0, 4.0]), seed=st.integers(0, 2**16))
def test_low_precision_fa_rule(cuda_backend, dtype, L, data, D, shared, eps, logit, seed):
    grid = data.draw(st.sampled_from(GRIDS[L]))
    # float16 overflows dsigma ~ 1/sigma^3 for small widths (the reference as much as the kernel):
    # keep its widths where the float16 reference itself stays finite.
    sig = data.draw(st.sampled_from(SIGMAS)) if dtype == torch.bfloat16 else (0.5, 2.0)
    br = _branch(2, 2, L, D, 1 if shared else 2, dtype, seed, sig, logit)
    check_backend(cuda_backend, br, grid, eps, dtype=dtype, seed=seed + 1,
                  label=f"{dtype} L={L} grid={grid} D={D} shared={shared} eps={eps} sigma={sig}")


@gpu
@settings(max_examples=40, deadline=None)
@given(grid=st.sampled_from(ODD_GRIDS), D=st.sampled_from([1, 16, 17, 33, 48, 64, 65, 100, 128]),
       shared=st.booleans(), eps=st.sampled_from([1e-4, 0.0]), sig=st.sampled_from(SIGMAS),
       seed=st.integers(0, 2**16))
def test_odd_shapes(cuda_backend, grid, D, shared, eps, sig, seed):
    L = grid[0] * grid[1]
    br = _branch(3, 2, L, D, 1 if shared else 3, torch.float32, seed, sig)
    check_backend(cuda_backend, br, grid, eps, dtype=torch.float32, seed=seed + 1,
                  label=f"grid={grid} D={D} shared={shared} eps={eps} sigma={sig}")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_statistics_dtype_and_inference_path(cuda_backend, dtype):
    grid, L, D = (16, 16), 256, 64
    q, k, v, s = _branch(2, 2, L, D, 1, dtype, 3)
    s = s.float()  # sigma is float32 for every input dtype
    res = backend_cuda.fwd([q], [k], [v], [s], *grid, D ** -0.5, 1e-4, [True])
    assert [r.dtype for r in res] == [dtype] + [torch.float32] * 5
    assert all(tuple(r.shape) == (2, 2, L) for r in res[1:])
    lean = backend_cuda.fwd([q], [k], [v], [s], *grid, D ** -0.5, 1e-4, [False])
    assert [r.numel() for r in lean[2:]] == [0, 0, 0, 0]
    assert torch.equal(lean[0], res[0]) and torch.equal(lean[1], res[1])


@gpu
@pytest.mark.parametrize("shared", [False, True])
def test_need_stats_false_gradients(cuda_backend, shared):
    grid, L, D, B = (31, 33), 1023, 64, 2
    br = _branch(B, 2, L, D, 1 if shared else B, torch.float32, 5)
    g_out, *_ = upstream(br[0], 6)
    zeros = torch.zeros(B, 2, L, dtype=torch.float64, device="cuda")
    ups = (g_out, zeros, zeros, zeros)

    def fused(q, k, v, s):
        out, st_ = fk.correlation_attention(q, k, v, s, grid, backend=cuda_backend, need_stats=False)
        assert st_ is None
        z = out.new_zeros(out.shape[:3])
        return out, z, z, z

    def ref(q, k, v, s):
        return correlation_reference(q, k, v, s, grid)

    got = values_and_grads(fused, br, ups)
    ref64 = values_and_grads(ref, tuple(t.double() for t in br), ups)
    ref32 = values_and_grads(ref, br, ups)
    assert_fa_rule(got, ref32, ref64, torch.float32, names=("out", "dq", "dk", "dv"))
    assert torch.count_nonzero(got["dsigma"]) == 0


def _fused_values_and_grads(fn, b1, b2, u1, u2):
    leaves = [t.detach().clone().requires_grad_(True) for t in (*b1, *b2)]
    outs = fn(leaves[:4], leaves[4:])
    loss = 0
    for (out, kl_attn, kl_prior, ent), (g_out, a, b, e) in zip(outs, (u1, u2)):
        loss = loss + ((out.double() * g_out).sum() + (kl_attn.double() * a).sum() + (kl_prior.double() * b).sum()
                       + (ent.double() * e).sum())
    grads = torch.autograd.grad(loss, leaves)
    res = []
    for i, (out, kl_attn, kl_prior, ent) in enumerate(outs):
        d = {"out": out, "kl": kl_attn, "kl_prior": kl_prior, "ent": ent}
        d.update(dict(zip(("dq", "dk", "dv", "dsigma"), grads[4 * i:4 * i + 4])))
        res.append({k_: v_.detach().double().cpu() for k_, v_ in d.items()})
    return res


@gpu
@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_fused_two_branches(cuda_backend, eps):
    grid, L, D, B = (32, 32), 1024, 64, 3
    intra = _branch(B, 2, L, D, B, torch.float32, 7)
    inter = _branch(B, 2, L, D, 1, torch.float32, 8, sig=(1e-5, 2.0))
    u1, u2 = upstream(intra[0], 9), upstream(inter[0], 10)

    def fused(b1, b2):
        oi, oe, si, se = fk.i2correlation(*b1, *b2, grid, eps=eps, backend=cuda_backend)
        return (oi, si.kl_attn, si.kl_prior, si.entropy), (oe, se.kl_attn, se.kl_prior, se.entropy)

    def ref(b1, b2):
        return correlation_reference(*b1, grid, eps=eps), correlation_reference(*b2, grid, eps=eps)

    got = _fused_values_and_grads(fused, intra, inter, u1, u2)
    r64 = _fused_values_and_grads(ref, [t.double() for t in intra], [t.double() for t in inter], u1, u2)
    r32 = _fused_values_and_grads(ref, intra, inter, u1, u2)
    for name, g, a, b in zip(("intra", "inter"), got, r32, r64):
        assert torch.equal(g["kl"], g["kl_prior"])
        assert_fa_rule(g, a, b, torch.float32, label=name)
    # The fused launch computes each branch exactly as a one-branch call does.
    for br, ups, g in ((intra, u1, got[0]), (inter, u2, got[1])):
        single = values_and_grads(lambda q, k, v, s: (lambda o, st_: (o, st_.kl_attn, st_.kl_prior, st_.entropy))(
            *fk.correlation_attention(q, k, v, s, grid, eps=eps, backend=cuda_backend)), br, ups)
        for n in ("out", "kl", "ent", "dq", "dk", "dv", "dsigma"):
            assert torch.equal(single[n], g[n]), n


@gpu
def test_deterministic_shared_memory(cuda_backend):
    grid, L, D, B = (32, 32), 1024, 64, 4
    br = _branch(B, 2, L, D, 1, torch.float32, 11)
    ups = upstream(br[0], 12)
    fn = lambda q, k, v, s: (lambda o, st_: (o, st_.kl_attn, st_.kl_prior, st_.entropy))(  # noqa: E731
        *fk.correlation_attention(q, k, v, s, grid, backend=cuda_backend))
    first = values_and_grads(fn, br, ups)
    for _ in range(49):
        again = values_and_grads(fn, br, ups)
        for n, x in first.items():
            assert torch.equal(x, again[n]), n


@gpu
def test_peak_memory_is_linear_in_L(cuda_backend):
    peaks = {}
    for L, grid in ((1024, (32, 32)), (4096, (64, 64))):
        br = [t.requires_grad_(True) for t in _branch(1, 2, L, 64, 1, torch.float32, 13)]
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out, st_ = fk.correlation_attention(*br, grid, backend=cuda_backend)
        (out.sum() + st_.kl_attn.sum() + st_.kl_prior.sum() + st_.entropy.sum()).backward()
        torch.cuda.synchronize()
        peaks[L] = torch.cuda.max_memory_allocated() - base
        del out, st_, br
    assert peaks[4096] < 4096 * 4096 * 4, f"an L x L float32 matrix would fit in the peak {peaks}"
    assert peaks[4096] < 6 * peaks[1024], f"peak memory grows faster than L: {peaks}"


@gpu
def test_agrees_with_triton(cuda_backend):
    if not fk.available_backends()["triton"].available:
        pytest.skip(f"triton backend unavailable: {fk.available_backends()['triton'].reason}")
    grid, L, D, B = (32, 32), 1024, 64, 2
    br = _branch(B, 2, L, D, 1, torch.float32, 14)
    ups = upstream(br[0], 15)
    ref64 = values_and_grads(reference_fn(grid, 1e-4), tuple(t.double() for t in br), ups)
    ref32 = values_and_grads(reference_fn(grid, 1e-4), br, ups)
    got = values_and_grads(backend_fn(cuda_backend, grid, 1e-4), br, ups)
    tri = values_and_grads(backend_fn("triton", grid, 1e-4), br, ups)
    assert_fa_rule(got, ref32, ref64, torch.float32, label="cuda")
    assert_fa_rule(tri, ref32, ref64, torch.float32, label="triton")
    assert_backends_agree(got, tri, ref32, ref64, torch.float32, label="cuda vs triton")


@gpu
def test_clear_errors(cuda_backend):
    q, k, v, s = _branch(1, 1, 16, 8, 1, torch.float64, 16)
    with pytest.raises(RuntimeError, match="float64"):
        fk.correlation_attention(q, k, v, s, (4, 4), backend=cuda_backend)
    q, k, v, s = _branch(1, 1, 16, 129, 1, torch.float32, 17)
    with pytest.raises(RuntimeError, match="head dim"):
        fk.correlation_attention(q, k, v, s, (4, 4), backend=cuda_backend)
    q, k, v, s = _branch(1, 1, 16, 8, 1, torch.float32, 18)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        backend_cuda.fwd([q], [k.cpu()], [v], [s], 4, 4, 0.5, 1e-4, [True])
