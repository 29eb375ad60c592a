"""Widths below SIGMA_MIN, in each kernel backend itself (not through functional.py, which passes sigma as it is).

Every backend reads max(sigma, SIGMA_MIN) and gives dsigma = 0 where sigma < SIGMA_MIN, the gradient of
torch.clamp_min, as the reference's sigma.clamp_min(SIGMA_MIN). sigma = 0 (allowed with check_values=False)
made the kernels NaN before they clamped (0.5 / sigma^2 = inf). The CUDA kernels get the same test through
their CPU simulation in test_cuda_sim.py (test_sim_sigma_below_minimum).
"""
import pytest
import torch

import fod_kernels as fk
from fod_kernels._backends import get_runner
from fod_kernels._validate import SIGMA_MIN
from fod_kernels.reference import correlation_reference
from helpers import assert_fa_rule, make_branch, upstream, values_and_grads

GRID = (3, 4)


def tiny_sigma_branch(seed=0, device="cpu"):
    """(q, k, v, sigma) float32 with widths 0, 1e-9, 1e-7, SIGMA_MIN / 2 and ordinary ones mixed, per row and axis."""
    q, k, v, s = make_branch(2, 2, 12, 16, 1, seed=seed, device=device)
    s = s.clone()
    s[0, 0, :4] = 1e-9
    s[0, 1, 2:6, 0] = 0.0
    s[1, 0, 5, 1] = 1e-7
    s[1, 1, 7] = 0.5 * SIGMA_MIN  # not SIGMA_MIN itself: float32(1e-6) < 1e-6, so where it clamps is dtype's
    s[1, 1, 8, 0] = 0.0
    return q, k, v, s


def check_tiny_sigma(run, branch, eps):
    """run: a kernel op's run (one branch); compared with the float64 reference (FA rule), finite everywhere."""
    ups = upstream(branch[0], seed=3)

    def ref(q, k, v, s):
        return correlation_reference(q, k, v, s, GRID, eps=eps)

    def kern(q, k, v, s):
        return run([(q, k, v, s)], *GRID, q.shape[-1] ** -0.5, eps, [True])[0]

    ref64 = values_and_grads(ref, tuple(t.double() for t in branch), ups)
    ref32 = values_and_grads(ref, branch, ups)
    got = values_and_grads(kern, branch, ups)
    for n, x in got.items():
        assert torch.isfinite(x).all(), f"{n} not finite"
    below = branch[3].cpu() < SIGMA_MIN
    assert (got["dsigma"][below] == 0).all()
    assert_fa_rule(got, ref32, ref64, torch.float32, label=f"eps={eps}")


def test_reference_clamps_with_clamp_min_gradient():
    q, k, v, s = (t.double() for t in tiny_sigma_branch())
    s.requires_grad_(True)
    _, _, klp, _ = correlation_reference(q, k, v, s, GRID)
    klp.sum().backward()
    assert torch.isfinite(klp).all() and (s.grad[s < SIGMA_MIN] == 0).all()
    s2 = s.detach().clamp_min(SIGMA_MIN)
    torch.testing.assert_close(klp, correlation_reference(q, k, v, s2, GRID)[2], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_kernel_clamps_sigma_itself(backend, eps):
    st = fk.available_backends()[backend]
    if not st.available:
        pytest.skip(f"{backend}: {st.reason}")
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    check_tiny_sigma(get_runner(backend), tiny_sigma_branch(device=dev), eps)


def test_sigma_min_is_one_constant():
    from fod_kernels import triton_kernels
    mod = pytest.importorskip("fod_kernels._C")
    assert mod.SIGMA_MIN == SIGMA_MIN == triton_kernels.SIGMA_MIN.value
