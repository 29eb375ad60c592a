"""The providers compute what they claim (run by `pytest benchmarks/test_bench_sanity.py`; skipped
under --benchmark-only). A benchmark of a wrong computation is worthless, so every provider must
match the spec-exact float64 reference: the same loss value and the same gradients of all eight
inputs (official: two backward passes summed = our one backward), the same inference outputs;
SDPA's outputs equal the reference outputs (the prior does not touch them)."""
import pytest
import torch

import providers as P

SHAPES = [(2, (4, 6), 8), (1, (5, 5), 16)]  # rectangular grid, L not a power of two


def _grads(prov, inp):
    inp.zero_grads()
    st = prov.fwd(inp)
    value = sum(float(s) for s in st) if isinstance(st, tuple) else float(st)
    prov.bwd(st)
    return value, [None if t.grad is None else t.grad.clone() for t in inp.leaves]


@pytest.mark.parametrize("B,grid,D", SHAPES)
@pytest.mark.parametrize("name", [p for p in P.PROVIDERS if p not in ("reference", "sdpa")])
def test_provider_matches_reference(name, B, grid, D):
    prov = P.make_provider(name)
    ok, why = prov.availability("cpu", torch.float64)
    if not ok:
        pytest.skip(why)
    inp = P.make_inputs(B, grid[0] * grid[1], D, torch.float64, grid=grid, seed=3)
    ref = P.make_provider("reference")
    v_ref, g_ref = _grads(ref, inp)
    v, g = _grads(prov, inp)
    assert v == pytest.approx(v_ref, rel=1e-9, abs=1e-12)
    for n, a, b in zip("q k v sigma q_ref k_ref v_ref sigma_ref".split(), g, g_ref):
        assert a is not None, f"{name}: no gradient reached {n}"
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10, msg=lambda m: f"{name} d{n}: {m}")
    with torch.no_grad():
        oi, oe, k = prov.infer(inp)
        ri, re, rk = ref.infer(inp)
    torch.testing.assert_close(oi, ri)
    torch.testing.assert_close(oe, re)
    if name == "official":  # the official scoring averages K over heads: (B, L)
        rk = rk.mean(1)
    torch.testing.assert_close(k, rk, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("B,grid,D", SHAPES)
def test_sdpa_outputs_match_reference(B, grid, D):
    inp = P.make_inputs(B, grid[0] * grid[1], D, torch.float64, grid=grid, seed=4)
    with torch.no_grad():
        oi, oe = P.make_provider("sdpa").infer(inp)
        ri, re, _ = P.make_provider("reference").infer(inp)
    torch.testing.assert_close(oi, ri)
    torch.testing.assert_close(oe, re)


def test_flops_convention():
    # 4*B*H*L*S*D per branch, two branches; backward 2.5x.
    assert P.flops("forward", 2, 8, 1024, 32) == 2 * 4 * 2 * 8 * 1024 * 1024 * 32
    assert P.flops("backward", 1, 1, 2, 1) == 2.5 * 2 * 4 * 4


def test_grid_for():
    assert P.grid_for(1024) == (32, 32)
    assert P.grid_for(2048) == (32, 64)
    assert P.grid_for(24) == (4, 6)
    assert P.grid_for(13) == (1, 13)
