"""The Triton backend on a CUDA device at realistic sizes (all tests marked gpu; skipped without a GPU).

Accuracy: values and all four gradients against the float64 reference with the FlashAttention rule of
tests/helpers (error <= 5x the same-precision PyTorch reference's error + a few ulps).
Also: bitwise determinism over 50 repeats, memory linear in L, agreement with the "cuda" backend.
"""
import pytest
import torch

import fod_kernels as fk
from helpers import assert_backends_agree, assert_fa_rule, backend_fn, check_backend, make_branch, reference_fn, \
    upstream, values_and_grads

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _bt():
    from fod_kernels import backend_triton
    return backend_triton


@pytest.mark.parametrize("grid", [(16, 16), (32, 32), (64, 64), (31, 33), (8, 128)])
@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(grid, D, dtype):
    L = grid[0] * grid[1]
    B, H = (1, 2) if L > 2048 else (2, 2)
    shared = D == 32  # both memory layouts at every size
    br = make_branch(B, H, L, D, 1 if shared else B, device=DEV, seed=L + D)
    check_backend("triton", br, grid, 1e-4, dtype=dtype, label=f"grid={grid} D={D} {dtype}")


# (D, eps) pairs rather than their product: each pair is one set of compiled variants (a cold compile
# costs seconds per variant), and together they cover a padded head dim (24, with 16-indivisible
# strides), the largest bucket (128) and exact logs (eps = 0).
@pytest.mark.parametrize("D,eps", [(24, 0.0), (128, 1e-4), (64, 0.0)])
@pytest.mark.parametrize("sig,logit", [((1e-5, 2.0), 1.0), ((0.1, 2.0), 10.0), ((1e-5, 1e-3), 10.0)])
def test_extremes(eps, sig, logit, D):
    """Tiny widths, large logits, eps = 0, head dims padded (24) and large (128), L not a block multiple."""
    grid = (23, 45)
    br = make_branch(2, 2, grid[0] * grid[1], D, 1, device=DEV, seed=D, sigma_lo=sig[0], sigma_hi=sig[1],
                     logit_scale=logit)
    check_backend("triton", br, grid, eps, label=f"eps={eps} sig={sig} logit={logit} D={D}")


def test_float16():
    br = make_branch(2, 4, 1024, 64, 2, device=DEV, sigma_lo=0.5)  # float16's reference overflows below ~0.3
    check_backend("triton", br, (32, 32), 1e-4, dtype=torch.float16)


def test_tf32_option_within_bf16_rule():
    """tf32 dots (10-bit mantissa) are held to the bfloat16 rule (7-bit mantissa)."""
    bt = _bt()
    br = make_branch(2, 2, 1024, 64, 1, device=DEV)
    grid, eps = (32, 32), 1e-4
    ups = upstream(br[0])
    ref64 = values_and_grads(reference_fn(grid, eps), tuple(t.double() for t in br), ups)
    ref_bf16 = values_and_grads(reference_fn(grid, eps), tuple(t.bfloat16() for t in br), ups)
    bt.set_fp32_precision("tf32")
    try:
        got = values_and_grads(backend_fn("triton", grid, eps), br, ups)
    finally:
        bt.set_fp32_precision("ieee")
    assert_fa_rule(got, ref_bf16, ref64, torch.bfloat16, label="tf32")


def test_fused_two_branches():
    B, H, grid, D = 2, 4, (32, 32), 64
    L = grid[0] * grid[1]
    intra = make_branch(B, H, L, D, B, device=DEV, seed=1)
    inter = make_branch(B, H, L, D, 1, device=DEV, seed=2)
    ups = [upstream(intra[0], 3), upstream(inter[0], 4)]
    leaves = [[t.clone().requires_grad_(True) for t in br] for br in (intra, inter)]
    oi, oe, si, se = fk.i2correlation(*leaves[0], *leaves[1], grid, backend="triton")
    loss = 0
    for (o, s), (g, a, b, e) in zip(((oi, si), (oe, se)), ups):
        loss = loss + (o.double() * g).sum() + (s.kl_attn.double() * a).sum() + \
            (s.kl_prior.double() * b).sum() + (s.entropy.double() * e).sum()
    grads = torch.autograd.grad(loss, leaves[0] + leaves[1])
    for i, (br, o, s) in enumerate(((intra, oi, si), (inter, oe, se))):
        ref64 = values_and_grads(reference_fn(grid, 1e-4), tuple(t.double() for t in br), ups[i])
        ref32 = values_and_grads(reference_fn(grid, 1e-4), br, ups[i])
        got = {"out": o, "kl": s.kl_attn, "ent": s.entropy}
        got.update(zip(("dq", "dk", "dv", "dsigma"), grads[4 * i:4 * i + 4]))
        got = {k: v.detach().double().cpu() for k, v in got.items()}
        assert_fa_rule(got, ref32, ref64, torch.float32, label=("intra", "inter")[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(dtype):
    """50 repeats of forward and backward of the fused call (intra Bk = B, inter Bk = 1): bitwise equal."""
    B, H, grid, D = 4, 4, (32, 32), 64
    L = grid[0] * grid[1]
    intra = make_branch(B, H, L, D, B, device=DEV, seed=1, dtype=dtype)
    inter = make_branch(B, H, L, D, 1, device=DEV, seed=2, dtype=dtype)
    g = torch.randn(B, H, L, D, device=DEV, dtype=dtype)

    def once():
        leaves = [t.clone().requires_grad_(True) for t in intra + inter]
        oi, oe, si, se = fk.i2correlation(*leaves, grid, backend="triton", check_values=False)
        loss = (oi * g).sum() + (oe * g).sum() + si.kl_attn.sum() - se.kl_prior.sum() + se.entropy.sum()
        return [oi, oe, si.kl_attn, se.entropy, *torch.autograd.grad(loss, leaves)]

    first = once()
    for _ in range(49):
        for a, b in zip(first, once()):
            assert torch.equal(a, b)


def _peak_bytes(backend, L, grid):
    br = make_branch(1, 2, L, 64, 1, device=DEV, seed=0)
    leaves = [t.clone().requires_grad_(True) for t in br]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, st = fk.correlation_attention(*leaves, grid, backend=backend)
    loss = out.square().sum() + st.kl_attn.sum() + st.kl_prior.sum() + st.entropy.sum()
    torch.autograd.grad(loss, leaves)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_memory_linear_in_L():
    """Peak extra memory of forward + backward: the reference grows ~16x from L = 1024 to 4096 (L x L
    matrices), the fused kernels ~4x (O(L) tensors only)."""
    tri = _peak_bytes("triton", 4096, (64, 64)) / _peak_bytes("triton", 1024, (32, 32))
    ref = _peak_bytes("reference", 4096, (64, 64)) / _peak_bytes("reference", 1024, (32, 32))
    assert ref > 10, f"reference ratio {ref:.2f}: the measurement does not see the L x L matrices"
    assert tri < 6, f"triton peak memory grew {tri:.2f}x for 4x L (reference {ref:.2f}x)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_agrees_with_cuda_backend(dtype):
    st = fk.available_backends()["cuda"]
    if not st.available:
        pytest.skip(f"cuda backend unavailable: {st.reason}")
    br = make_branch(2, 4, 1024, 64, 1, device=DEV, seed=9)
    grid = (32, 32)
    ups = upstream(br[0])
    b_lp = tuple(t.to(dtype) for t in br)
    ref64 = values_and_grads(reference_fn(grid, 1e-4), tuple(t.double() for t in br), ups)
    ref_lp = values_and_grads(reference_fn(grid, 1e-4), b_lp, ups)
    tri = values_and_grads(backend_fn("triton", grid, 1e-4), b_lp, ups)
    cud = values_and_grads(backend_fn("cuda", grid, 1e-4), b_lp, ups)
    assert_fa_rule(tri, ref_lp, ref64, dtype, label="triton")
    assert_fa_rule(cud, ref_lp, ref64, dtype, label="cuda")
    assert_backends_agree(tri, cud, ref_lp, ref64, dtype, label="triton vs cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_the_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: the launches follow the tensors (device guard)."""
    br = make_branch(2, 2, 256, 32, 1, device="cuda:1", seed=5)
    with torch.cuda.device(0):
        got, _ = check_backend("triton", br, (16, 16), 1e-4, label="cuda:1")
    assert got["out"].numel() > 0
