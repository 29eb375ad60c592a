"""The Triton backend against the float64 reference (values and all four gradients, FA tolerance rule).

Without a GPU this runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so the shapes are small. test_kernels_compile_for_sm90 additionally lowers the kernels through
the real compiler to sm_90 machine code (no GPU needed), which the interpreter never does.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fod_kernels as fk
from fod_kernels.reference import correlation_reference
from helpers import assert_fa_rule, check_backend, make_branch, upstream

bt = pytest.importorskip("fod_kernels.backend_triton")
if not bt.status()[0]:
    pytest.skip(f"triton backend unavailable: {bt.status()[1]}", allow_module_level=True)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GRIDS = [(3, 5), (4, 7), (1, 23), (7, 1), (5, 5), (2, 9), (6, 8), (1, 48)]
SIGMAS = [(0.1, 2.0), (1e-5, 2.0), (1e-5, 1e-3), (0.5, 2.0)]


def test_status_and_device():
    ok, why = bt.status()
    assert ok, why
    assert bt.supports_device(torch.device(DEV))[0]
    assert not bt.supports_device(torch.device("meta"))[0]
    assert fk.available_backends()["triton"].available


@settings(max_examples=20)
@given(grid=st.sampled_from(GRIDS), B=st.integers(1, 2), H=st.integers(1, 2), D=st.sampled_from([16, 24, 32]),
       shared=st.booleans(), eps=st.sampled_from([1e-4, 0.0]), sig=st.sampled_from(SIGMAS),
       logit=st.sampled_from([1.0, 10.0]), seed=st.integers(0, 2 ** 16))
@example(grid=(3, 5), B=2, H=2, D=16, shared=True, eps=0.0, sig=(1e-5, 2.0), logit=10.0, seed=0)
@example(grid=(4, 7), B=2, H=1, D=32, shared=False, eps=1e-4, sig=(1e-5, 1e-3), logit=10.0, seed=1)
@example(grid=(1, 48), B=1, H=2, D=24, shared=True, eps=1e-4, sig=(0.1, 2.0), logit=1.0, seed=2)
def test_matches_reference(grid, B, H, D, shared, eps, sig, logit, seed):
    L = grid[0] * grid[1]
    br = make_branch(B, H, L, D, 1 if shared else B, device=DEV, seed=seed, sigma_lo=sig[0], sigma_hi=sig[1],
                     logit_scale=logit)
    check_backend("triton", br, grid, eps, seed=seed + 1, label=f"grid={grid} B={B} H={H} D={D} shared={shared}")


@pytest.mark.parametrize("shared", [True, False])
def test_single_token(shared):
    """L = 1: p = t = 1, so ds = gv - dfull is an exact cancellation for the reference, while the kernel's
    gv = <g_out, v> and the contract's dfull = <g_out, out> are D-term fp32 dots summed in different orders.
    Their difference is a few ulps of |g_out||v| ~ D, hence a floor of 8 * D ulps instead of 32."""
    br = make_branch(2, 2, 1, 24, 1 if shared else 2, device=DEV)
    check_backend("triton", br, (1, 1), 1e-4, floor_ulps=8 * 24)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared", [True, False])
def test_half_precision(dtype, shared):
    # float16's own reference overflows (inf - inf) in dsigma for small sigma; widths in [0.5, 2] keep it finite.
    br = make_branch(2, 2, 35, 32, 1 if shared else 2, device=DEV, sigma_lo=0.5)
    check_backend("triton", br, (5, 7), 1e-4, dtype=dtype, label=str(dtype))


def test_scale_argument():
    br = make_branch(1, 2, 20, 16, 1, device=DEV, seed=3)
    check_backend("triton", br, (4, 5), 1e-4, scale=0.7)


def _run_pair(brs, grid, eps, need, backend, ups):
    """Values and gradients of the fused two-branch call (backend None: reference per branch)."""
    leaves = [[t.detach().clone().requires_grad_(True) for t in br] for br in brs]
    if backend is None:
        res = [correlation_reference(*lv, grid, eps=eps) for lv in leaves]
        res = [r if n else (r[0], None, None, None) for r, n in zip(res, need)]
    else:
        oi, oe, si, se = fk.i2correlation(*leaves[0], *leaves[1], grid, eps=eps, backend=backend, need_stats=need)
        res = [(o, *(s if s is not None else (None, None, None))) for o, s in ((oi, si), (oe, se))]
    loss = 0
    for (out, kla, klp, ent), (g_out, a, b, e) in zip(res, ups):
        loss = loss + (out.double() * g_out).sum()
        if kla is not None:
            loss = loss + (kla.double() * a).sum() + (klp.double() * b).sum() + (ent.double() * e).sum()
    flat = [t for lv in leaves for t in lv]
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    dicts = []
    for i, (out, kla, klp, ent) in enumerate(res):
        d = {"out": out}
        if kla is not None:
            d.update(kl=kla, kl_prior=klp, ent=ent)
        for j, name in enumerate(("dq", "dk", "dv", "dsigma")):
            g = grads[4 * i + j]
            d[name] = torch.zeros_like(flat[4 * i + j]) if g is None else g
        dicts.append({k: v.detach().double().cpu() for k, v in d.items()})
    return dicts


@settings(max_examples=6)
@given(grid=st.sampled_from([(3, 5), (4, 7), (1, 13), (6, 6)]), need=st.sampled_from(
    [(True, True), (False, True), (True, False), (False, False)]), eps=st.sampled_from([1e-4, 0.0]),
    mem_batch=st.sampled_from([1, 2]), seed=st.integers(0, 1000))
@example(grid=(4, 7), need=(True, True), eps=1e-4, mem_batch=1, seed=0)
@example(grid=(3, 5), need=(False, True), eps=0.0, mem_batch=1, seed=1)
def test_fused_two_branches(grid, need, eps, mem_batch, seed):
    """i2correlation(backend="triton"): intra (Bk = B) and inter (Bk = mem_batch) in one launch per pass."""
    B, H, L, D = 2, 2, grid[0] * grid[1], 16
    intra = make_branch(B, H, L, D, B, device=DEV, seed=seed)
    inter = make_branch(B, H, L, D, mem_batch, device=DEV, seed=seed + 7, sigma_lo=1e-5)
    ups = [upstream(intra[0], seed + 1), upstream(inter[0], seed + 2)]
    ref64 = _run_pair([tuple(t.double() for t in b) for b in (intra, inter)], grid, eps, need, None, ups)
    ref32 = _run_pair([intra, inter], grid, eps, need, None, ups)
    got = _run_pair([intra, inter], grid, eps, need, "triton", ups)
    for i, name in enumerate(("intra", "inter")):
        names = ("out", "kl", "ent", "dq", "dk", "dv", "dsigma") if need[i] else ("out", "dq", "dk", "dv", "dsigma")
        assert set(got[i]) == set(ref64[i]), f"{name}: statistics returned {sorted(got[i])}"
        assert_fa_rule(got[i], ref32[i], ref64[i], torch.float32, names=names, label=name)


def test_inference_path_returns_empty_stats():
    q, k, v, s = make_branch(2, 1, 12, 16, 1, device=DEV)
    res = bt.fwd([q, q], [k, k], [v, v], [s, s], 3, 4, 0.25, 1e-4, [False, True])
    assert len(res) == 12
    for t in res[2:6]:
        assert t.shape == (0,)
    for t in res[8:12]:
        assert t.shape == (2, 1, 12)
    # The branch without statistics has the same lse as the one with them, and out to rounding (it comes
    # from pass 1's rescaled accumulation instead of pass 2's exact p).
    assert torch.equal(res[1], res[7])
    torch.testing.assert_close(res[0], res[6], rtol=1e-5, atol=1e-6)


def test_deterministic():
    br = make_branch(2, 2, 35, 16, 1, device=DEV, seed=5)
    ups = upstream(br[0])
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in br]
        out, st_ = fk.correlation_attention(*leaves, (5, 7), backend="triton")
        loss = (out * ups[0].float()).sum() + (st_.kl_attn * ups[1].float()).sum() + \
            (st_.kl_prior * ups[2].float()).sum() + (st_.entropy * ups[3].float()).sum()
        runs.append([out, st_.kl_attn, st_.entropy, *torch.autograd.grad(loss, leaves)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_bad_dtype_raises(dtype):
    q, k, v, s = (t.to(dtype) for t in make_branch(1, 1, 6, 16, 1, device=DEV))
    with pytest.raises(TypeError, match=str(dtype).replace("torch.", "")):
        bt.fwd([q], [k], [v], [s], 2, 3, 0.25, 1e-4, [True])
    if dtype == torch.float64:
        with pytest.raises(TypeError, match="reference"):
            fk.correlation_attention(q, k, v, s, (2, 3), backend="triton")


def test_fp32_precision_setter():
    assert bt.get_fp32_precision() == "ieee"
    with pytest.raises(ValueError, match="tf32"):
        bt.set_fp32_precision("bf16")
    bt.set_fp32_precision("tf32")
    try:
        assert bt.get_fp32_precision() == "tf32"
    finally:
        bt.set_fp32_precision("ieee")


def test_torch_compile_fullgraph():
    """The op is one opaque custom op to torch.compile: the graph traces whole and matches eager."""
    q, k, v, s = make_branch(1, 2, 12, 16, 1, device=DEV)

    def f(q, k, v, s):
        (out, kla, klp, ent), = bt.run([(q, k, v, s)], 3, 4, 0.25, 1e-4, [True])
        return out.square().sum() + kla.sum() + 2 * klp.sum() + ent.sum()

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, s)]
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y1 = compiled(*leaves)
    g1 = torch.autograd.grad(y1, leaves)
    y2 = f(*leaves)
    g2 = torch.autograd.grad(y2, leaves)
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


_AOT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fod_kernels import triton_kernels as tk
    INTS = {"KBS0", "KBS1", "BK0", "BK1", "B", "H", "L", "D", "rows", "cols", "NROW"}

    def build(fn, dt, consts, warps, stages):
        sig = {}
        for n in fn.arg_names:
            if n in consts:
                sig[n] = "constexpr"
            elif n in ("scale", "eps"):
                sig[n] = "fp32"
            elif n in INTS:
                sig[n] = "i32"
            elif n.startswith(("ROW", "LSE", "KL", "ENT", "RA", "RB")):
                sig[n] = "*fp32"
            else:
                sig[n] = "*" + dt
        k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps, num_stages=stages))
        assert k.metadata.shared <= 232448, (fn.__name__, consts, k.metadata.shared)

    b = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64)
    build(tk.fwd_kernel, "fp32", dict(STATS=True, EPS_ZERO=False, PREC="ieee", UPCAST=False, BLOCK_G=32, **b), 4, 2)
    build(tk.fwd_kernel, "fp32", dict(STATS=True, EPS_ZERO=True, PREC="tf32", UPCAST=False, BLOCK_G=32, **b), 4, 2)
    build(tk.fwd_kernel, "bf16", dict(STATS=False, EPS_ZERO=False, PREC="ieee", UPCAST=False, BLOCK_G=32,
                                      BLOCK_M=128, BLOCK_N=64, BLOCK_D=32), 8, 3)
    build(tk.bwd_dkdv_kernel, "fp32", dict(EPS_ZERO=True, PREC="ieee", UPCAST=False, BLOCK_M=64, BLOCK_N=32,
                                          BLOCK_D=128), 8, 2)
    build(tk.bwd_dq_kernel, "bf16", dict(EPS_ZERO=False, PREC="ieee", UPCAST=False, **b), 4, 3)
    build(tk.logz_kernel, "fp32", dict(BLOCK_M=64, BLOCK_G=32), 4, 2)
    print("compiled")
""")


def test_kernels_compile_for_sm90():
    """Lower the kernels to sm_90 machine code with the real compiler (no GPU needed); the interpreter
    accepts Python that the compiler rejects (globals, type-mismatched branches), this does not."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", _AOT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
