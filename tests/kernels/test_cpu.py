"""The fused C++ CPU kernels against the float64 reference (values and all gradients)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fod_kernels as fk
from helpers import assert_fa_rule, backend_fn, check_backend, make_branch, opcheck_strided, upstream, \
    values_and_grads

pytestmark = pytest.mark.skipif(not fk.available_backends()["cpu"].available,
                                reason=f"cpu backend: {fk.available_backends()['cpu'].reason}")

GRIDS = [(1, 7), (3, 4), (5, 7), (7, 5), (4, 10), (6, 6), (9, 5), (2, 33)]


@settings(max_examples=40, deadline=None)
@given(grid=st.sampled_from(GRIDS), B=st.integers(1, 3), H=st.integers(1, 3), D=st.sampled_from([4, 16, 32, 33]),
       shared=st.booleans(), eps=st.sampled_from([1e-4, 0.0, 1e-2]),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       sig=st.sampled_from([(0.1, 2.0), (1e-5, 2.0), (1e-5, 1e-3), (1.0, 2.0)]),
       logit=st.sampled_from([1.0, 10.0]), seed=st.integers(0, 2 ** 16))
def test_matches_float64_reference(grid, B, H, D, shared, eps, dtype, sig, logit, seed):
    L = grid[0] * grid[1]
    br = make_branch(B, H, L, D, 1 if shared else B, dtype=torch.float64, seed=seed, sigma_lo=sig[0],
                     sigma_hi=sig[1], logit_scale=logit)
    check_backend("cpu", br, grid, eps, dtype=dtype, seed=seed + 1, label=f"{grid} B{B} H{H} D{D} {dtype} eps={eps}")


def test_long_rows_not_multiple_of_block():
    br = make_branch(2, 2, 37 * 3, 32, 1, seed=3)  # L = 111: not a multiple of the 32-row block
    check_backend("cpu", br, (37, 3), 1e-4)


def _gradcheck_routes(grid, eps, shared, seed):
    """gradcheck each gradient route where it is a true derivative: kl_attn, entropy and out w.r.t.
    q, k, v with sigma held fixed; kl_prior w.r.t. sigma with q, k, v held fixed."""
    L = grid[0] * grid[1]
    q, k, v, s = make_branch(2, 2, L, 4, 1 if shared else 2, dtype=torch.float64, seed=seed, sigma_lo=0.3)

    def attn_side(q_, k_, v_):
        out, st_ = fk.correlation_attention(q_, k_, v_, s, grid, eps=eps, backend="cpu", check_values=False)
        return out, st_.kl_attn, st_.entropy

    def prior_side(s_):
        _, st_ = fk.correlation_attention(q, k, v, s_, grid, eps=eps, backend="cpu", check_values=False)
        return st_.kl_prior

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    assert torch.autograd.gradcheck(attn_side, leaves, eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(prior_side, [s.clone().requires_grad_()], eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("shared", [False, True])
def test_gradcheck_float64(shared):
    _gradcheck_routes((2, 3), 1e-4, shared, seed=11)


def test_gradcheck_eps_zero():
    _gradcheck_routes((3, 2), 0.0, True, seed=2)


def test_fused_i2correlation_equals_two_single_calls():
    intra = make_branch(2, 2, 20, 16, 2, seed=1)
    inter = make_branch(2, 2, 20, 16, 1, seed=2)
    oi, oe, si, se = fk.i2correlation(*intra, *inter, (4, 5), backend="cpu")
    o1, s1 = fk.correlation_attention(*intra, (4, 5), backend="cpu")
    o2, s2 = fk.correlation_attention(*inter, (4, 5), backend="cpu")
    assert torch.equal(oi, o1) and torch.equal(oe, o2)
    for a, b in zip(si + se, s1 + s2):
        assert torch.equal(a, b)


def test_fused_gradients_against_reference():
    """The fused call's gradients, float32 against the float64 reference (the tolerance rule of helpers)."""
    intra = make_branch(2, 2, 20, 16, 2, seed=1)
    inter = make_branch(2, 2, 20, 16, 1, seed=2)

    def grads(backend, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in intra + inter]
        oi, oe, si, se = fk.i2correlation(*leaves, (4, 5), backend=backend)
        loss = (oi.square().sum() + oe.sum() + (si.kl_attn - si.entropy + 0.5 * si.kl_prior).sum()
                + se.kl_prior.sum() - se.kl_attn.sum() + se.entropy.sum())
        names = [f"{g}_{br}" for br in ("intra", "inter") for g in ("dq", "dk", "dv", "dsigma")]
        return {n: g.double() for n, g in zip(names, torch.autograd.grad(loss, leaves))}

    ref64, ref32 = grads("reference", torch.float64), grads("reference", torch.float32)
    got = grads("cpu", torch.float32)
    assert_fa_rule(got, ref32, ref64, torch.float32, names=tuple(ref64))


def test_need_stats_false_gives_same_out():
    br = make_branch(1, 2, 12, 8, 1, seed=4)
    out, stats = fk.correlation_attention(*br, (3, 4), backend="cpu", need_stats=False)
    out2, _ = fk.correlation_attention(*br, (3, 4), backend="cpu")
    assert stats is None
    assert torch.equal(out, out2)
    oi, oe, si, se = fk.i2correlation(*br, *br, (3, 4), backend="cpu", need_stats=(False, True))
    assert si is None and se is not None and torch.equal(oi, out2)


def test_deterministic_shared_memory_gradients():
    br = make_branch(4, 2, 30, 16, 1, seed=9)
    ups = upstream(br[0], seed=2)
    first = values_and_grads(backend_fn("cpu", (5, 6), 1e-4), br, ups)
    for _ in range(5):
        again = values_and_grads(backend_fn("cpu", (5, 6), 1e-4), br, ups)
        for n in first:
            assert torch.equal(first[n], again[n]), n


def test_low_precision_inputs_compute_in_float32():
    br = make_branch(1, 2, 12, 8, 1, seed=4)
    for dt in (torch.bfloat16, torch.float16):
        lp = [t.to(dt) for t in br]
        out, st_ = fk.correlation_attention(*lp, (3, 4), backend="cpu")
        assert out.dtype == dt and st_.kl_attn.dtype == torch.float32
        ref, rst = fk.correlation_attention(*[t.float() for t in lp], (3, 4), backend="cpu")
        assert torch.equal(out, ref.to(dt))  # the float32 computation, rounded once
        assert torch.equal(st_.kl_attn, rst.kl_attn)


def test_torch_compile_traces_the_op():
    br = make_branch(1, 2, 12, 8, 1, seed=4)

    def f(q, k, v, s):
        out, st_ = fk.correlation_attention(q, k, v, s, (3, 4), backend="cpu", check_values=False)
        return out.sum() + st_.kl_attn.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*br), f(*br))


def test_strided_inputs_and_opcheck():
    """(B, L, H, D)-strided inputs: the cpu backend copies them (its kernels pack q, k, v into padded
    blocks anyway), gives bitwise the contiguous result, and its outputs match the ops' fakes."""
    from fod_kernels import backend_cpu
    br = make_branch(2, 2, 15, 16, 1, seed=6)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in br]
    ups = upstream(br[0], 7)
    a = values_and_grads(backend_fn("cpu", (3, 5), 1e-4), br, ups)
    b = values_and_grads(backend_fn("cpu", (3, 5), 1e-4), strided, ups)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    opcheck_strided(backend_cpu.run)
    opcheck_strided(backend_cpu.run, masked=True)
