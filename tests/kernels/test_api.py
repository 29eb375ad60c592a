"""Public API: input checks, backend selection, the I2Correlation module and the one-backward minimax."""
import pytest
import torch

import fod_kernels as fk
from helpers import make_branch

HAS_CPU = fk.available_backends()["cpu"].available
KERNEL = "cpu" if HAS_CPU else "reference"


def good(B=2, H=2, L=12, D=8, Bk=1):
    return list(make_branch(B, H, L, D, Bk, seed=0))


def call(q, k, v, s, grid=(3, 4), **kw):
    return fk.correlation_attention(q, k, v, s, grid, backend=kw.pop("backend", "reference"), **kw)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("mutate, exc, words", [
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, "4 dimensions"),
    (lambda a: a.__setitem__(1, torch.randn(1, 3, 12, 8)), ValueError, "k must have shape"),
    (lambda a: a.__setitem__(1, torch.randn(3, 2, 12, 8)), ValueError, "batch must be 1"),
    (lambda a: a.__setitem__(2, torch.randn(1, 2, 12, 4)), ValueError, "v must have the shape of k"),
    (lambda a: a.__setitem__(3, torch.rand(2, 2, 12, 1)), ValueError, "sigma must have shape"),
    (lambda a: (a.__setitem__(1, torch.randn(1, 2, 10, 8)), a.__setitem__(2, torch.randn(1, 2, 10, 8))), ValueError,
     "multiple m\\*L"),
    (lambda a: a[3].__setitem__((0, 0, 0, 0), 0.0), ValueError, "sigma must be > 0"),
    (lambda a: a[3].__setitem__((0, 0, 0, 0), -1.0), ValueError, "sigma must be > 0"),
    (lambda a: a[0].__setitem__((0, 0, 0, 0), float("nan")), ValueError, "q contains NaN"),
    (lambda a: a[2].__setitem__((0, 0, 0, 0), float("inf")), ValueError, "v contains NaN or inf"),
    (lambda a: a.__setitem__(1, a[1].double()), TypeError, "share one dtype"),
    (lambda a: a.__setitem__(3, a[3].double()), TypeError, "sigma must be float32 or q's dtype"),
    (lambda a: a.__setitem__(0, a[0].to(torch.int32)), TypeError, "floating"),
    (lambda a: a.__setitem__(0, a[0].to("meta")), ValueError, "one device"),
    (lambda a: a.__setitem__(0, a[0].numpy()), TypeError, "torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(backend, mutate, exc, words):
    if backend == "cpu" and not HAS_CPU:
        pytest.skip("cpu backend not built")
    a = good()
    mutate(a)
    with pytest.raises(exc, match=words):
        call(*a, backend=backend)


@pytest.mark.parametrize("grid, words", [((4, 4), "16 cells"), ((3,), "pair"), ((0, 12), "positive"), ("ab", "pair")])
def test_bad_grid(grid, words):
    with pytest.raises((ValueError, TypeError), match=words):
        call(*good(), grid=grid)


@pytest.mark.parametrize("kw, words", [(dict(eps=-1.0), "eps"), (dict(eps=float("nan")), "eps"),
                                      (dict(scale=0.0), "scale")])
def test_bad_scalars(kw, words):
    with pytest.raises(ValueError, match=words):
        call(*good(), **kw)


def test_unknown_and_unavailable_backends_are_errors_not_fallbacks():
    with pytest.raises(ValueError, match="unknown backend"):
        call(*good(), backend="fastest")
    status = fk.available_backends()
    assert set(status) == {"reference", "cpu", "triton", "cuda"}
    assert all(isinstance(s.reason, str) and s.reason for s in status.values())
    if not torch.cuda.is_available():
        assert not status["cuda"].available
        with pytest.raises(RuntimeError, match="cuda"):
            call(*good(), backend="cuda")


def test_auto_picks_the_cpu_kernel_for_cpu_tensors():
    if not HAS_CPU:
        pytest.skip("cpu backend not built")
    from fod_kernels._backends import resolve_backend
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_non_contiguous_inputs_give_the_contiguous_result():
    q, k, v, s = good(Bk=2)
    nc = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, s)]
    assert not nc[0].is_contiguous()
    o1, s1 = call(q, k, v, s, backend=KERNEL)
    o2, s2 = call(*nc, backend=KERNEL)
    assert torch.equal(o1, o2) and torch.equal(s1.kl_attn, s2.kl_attn)


def test_expanded_memory_is_treated_as_shared():
    q, k, v, s = good(Bk=1)
    o1, _ = call(q, k, v, s, backend=KERNEL)
    kk, vv = (t.detach().clone().requires_grad_() for t in (k, v))
    o2, _ = call(q, kk.expand(2, -1, -1, -1), vv.expand(2, -1, -1, -1), s, backend=KERNEL)
    assert torch.equal(o1, o2)
    o2.sum().backward()
    assert kk.grad.shape == k.shape


def test_module_shapes_and_out_proj_switch():
    torch.manual_seed(0)
    m = fk.I2Correlation(32, 4, (4, 5), backend=KERNEL)
    x, ref = torch.randn(3, 20, 32), torch.randn(1, 20, 32)
    h, si, se = m(x, ref)
    assert h.shape == (3, 20, 32) and si.kl_attn.shape == (3, 4, 20) and se.entropy.shape == (3, 4, 20)
    compat = fk.I2Correlation(32, 4, (4, 5), backend=KERNEL, out_proj=False)
    assert not hasattr(compat, "intra_out")
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(3, 20, 16), ref)
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(3, 21, 32), torch.randn(1, 21, 32))
    with pytest.raises(ValueError, match="divisible"):
        fk.I2Correlation(30, 4, (4, 5))


def test_module_kernel_matches_reference():
    torch.manual_seed(0)
    m = fk.I2Correlation(32, 4, (4, 5), backend="reference").double()
    x, ref = torch.randn(2, 20, 32, dtype=torch.float64), torch.randn(1, 20, 32, dtype=torch.float64)
    h_ref, si_ref, se_ref = m(x, ref)
    m.backend = KERNEL
    h, si, se = m(x, ref)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(se.kl_attn, se_ref.kl_attn)


def _minimax_losses(m, x, ref, l1=0.5, l2=0.5):
    h, si, se = m(x, ref)
    rec = (h - x).square().mean() + (1 - torch.nn.functional.cosine_similarity(h, x, dim=-1)).mean()
    return rec, si, se


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_single_backward_equals_official_two_backward(backend):
    """One backward of the routed loss == loss1 (attention detached) + loss2 (prior detached), summed."""
    if backend == "cpu" and not HAS_CPU:
        pytest.skip("cpu backend not built")
    torch.manual_seed(1)
    l1 = l2 = 0.5
    m = fk.I2Correlation(16, 2, (3, 4), backend=backend).double()
    x, ref = torch.randn(2, 12, 16, dtype=torch.float64), torch.randn(1, 12, 16, dtype=torch.float64)

    # ours: one scalar, one backward
    m.zero_grad()
    rec, si, se = _minimax_losses(m, x, ref)
    K = lambda s, route: getattr(s, route).mean()  # noqa: E731
    loss = (2 * rec + l1 * K(si, "kl_prior") - l1 * K(se, "kl_prior") - l1 * K(si, "kl_attn")
            - l2 * si.entropy.mean() + l1 * K(se, "kl_attn") + l2 * se.entropy.mean())
    loss.backward()
    ours = {n: p.grad.clone() for n, p in m.named_parameters()}

    # official: two losses on materialised matrices with explicit detaches, two backward passes
    from fod_kernels.reference import correlation_reference
    m.zero_grad()
    grads = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    for which in (1, 2):
        m.zero_grad()
        H, Dh = m.n_heads, m.d_head
        heads = lambda t: t.view(t.shape[0], 12, H, Dh).transpose(1, 2)  # noqa: E731
        branches = [
            (heads(m.intra_q(x)), heads(m.intra_k(x)), heads(m.intra_v(x)), m._sigma(m.intra_sigma, x)),
            (heads(m.inter_q(x)), heads(m.inter_k(ref)), heads(m.inter_v(ref)), m._sigma(m.inter_sigma, x)),
        ]
        outs, Ks, Es = [], [], []
        for q, k, v, s in branches:
            out, kla, klp, ent = correlation_reference(q, k, v, s, (3, 4))
            outs.append(m._merge(out))
            Ks.append(klp.mean() if which == 1 else kla.mean())  # loss 1: sigma only; loss 2: q, k only
            Es.append(ent.mean())
        h = m.intra_out(outs[0]) - m.inter_out(outs[1])
        rec = (h - x).square().mean() + (1 - torch.nn.functional.cosine_similarity(h, x, dim=-1)).mean()
        if which == 1:
            lo = rec + l1 * Ks[0] - l1 * Ks[1]
        else:
            lo = rec - l1 * Ks[0] - l2 * Es[0] + l1 * Ks[1] + l2 * Es[1]
        lo.backward()
        for n, p in m.named_parameters():
            if p.grad is not None:
                grads[n] += p.grad
    for n in ours:
        torch.testing.assert_close(ours[n], grads[n], msg=lambda s, n=n: f"{n}: {s}")


def test_module_check_values_switch():
    m = fk.I2Correlation(16, 2, (3, 4), backend=KERNEL)
    x, ref = torch.randn(2, 12, 16), torch.randn(1, 12, 16)
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m(x, ref)
    m.check_values = False
    h, _, _ = m(x, ref)  # no scan: the NaN propagates instead of raising
    assert torch.isnan(h).any()


# ---------------------------------------------------------------- clearer errors (issues 11 and 17)

def test_heads_last_layout_is_named():
    """(B, L, H, D) tensors used to be blamed on sigma's shape."""
    q, k, v, s = good(L=12, H=2)
    with pytest.raises(ValueError, match=r"\(B, L, H, D\) layout.*transpose\(1, 2\)"):
        call(*(t.transpose(1, 2) for t in (q, k, v, s)))


@pytest.mark.parametrize("grid", [8, (4.9, 4.2), (3.0, 4.0), ("3", "4"), "34", (True, 12), (3, 4, 1), None])
def test_grid_must_be_a_pair_of_ints(grid):
    with pytest.raises(TypeError, match=r"grid must be a pair \(rows, cols\) of ints"):
        call(*good(), grid=grid)
    with pytest.raises(TypeError, match=r"grid must be a pair \(rows, cols\) of ints"):
        fk.I2Correlation(16, 2, grid)


def test_grid_accepts_numpy_and_torch_integers():
    import numpy as np
    o1, _ = call(*good(), grid=(np.int64(3), torch.tensor(4)))
    o2, _ = call(*good(), grid=(3, 4))
    assert torch.equal(o1, o2)
    assert fk.I2Correlation(16, 2, (np.int32(3), torch.tensor(4))).grid == (3, 4)


def test_mismatched_grid_states_the_row_major_convention():
    with pytest.raises(ValueError, match=r"\(2, 5\) has 10 cells but q has L=12 tokens.*row-major"):
        call(*good(L=12), grid=(2, 5))
    m = fk.I2Correlation(16, 2, (6, 10))
    with pytest.raises(ValueError, match="row-major"):
        m(torch.randn(1, 50, 16), torch.randn(1, 50, 16))


@pytest.mark.parametrize("scale", [float("inf"), float("-inf"), float("nan"), 0.0, -1.0, "1", True])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        call(*good(), scale=scale)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_sigma_is_finite_and_agrees(backend, dtype):
    """sigma down to 1e-30 tokens (was NaN from 1e-20 in float32, 1e-170 in float64: sigma^2 underflowed to 0).
    Every width below SIGMA_MIN gives the one-hot prior of sigma = 1e-3 in the float64 reference, exactly."""
    if backend == "cpu" and not HAS_CPU:
        pytest.skip("cpu backend not built")
    q, k, v, _ = make_branch(2, 2, 12, 8, 1, dtype=torch.float64, seed=2)
    from helpers import reference_fn, upstream, values_and_grads
    ups = upstream(q, seed=3)
    one_hot = torch.full((2, 2, 12, 2), 1e-3, dtype=torch.float64)  # exp(-1 / (2e-6)) = 0: a one-hot prior
    oracle = values_and_grads(reference_fn((3, 4), 1e-4), (q, k, v, one_hot), ups)
    assert oracle["dsigma"].abs().max() == 0
    for tiny in (1e-30, 1e-25, 1e-20, 1e-12, 1e-6) + ((1e-200,) if dtype == torch.float64 else ()):
        s = torch.full((2, 2, 12, 2), tiny, dtype=dtype)
        s[0, 0, 0, 1] = 0.5  # one ordinary row, to show the clamp leaves other rows alone
        got = values_and_grads(lambda *a: _outs(backend, *a), tuple(t.to(dtype) for t in (q, k, v)) + (s,), ups)
        want = values_and_grads(reference_fn((3, 4), 1e-4), (q, k, v, s.double().clamp_min(1e-3)), ups)
        for n in got:
            assert torch.isfinite(got[n]).all(), f"{n} not finite at sigma={tiny}"
            tol = 1e-4 if dtype == torch.float32 else 1e-10
            torch.testing.assert_close(got[n], want[n], rtol=tol, atol=tol, msg=lambda m, n=n: f"sigma={tiny} {n}: {m}")


def _outs(backend, q, k, v, s):
    out, st = fk.correlation_attention(q, k, v, s, (3, 4), backend=backend)
    return out, st.kl_attn, st.kl_prior, st.entropy


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_overflowing_scores_are_an_error_not_a_silent_nan(backend):
    if backend == "cpu" and not HAS_CPU:
        pytest.skip("cpu backend not built")
    q, k, v, s = good()
    q, k = q * 1e19, k * 1e19  # finite, but scale * <q, k> overflows float32 (the float64 reference is finite)
    with pytest.raises(ValueError, match="overflow"):
        call(q, k, v, s, backend=backend)
    out, _ = call(q.double(), k.double(), v.double(), s.double(), backend=backend)  # float64 has the range
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- sigma parametrisation

def test_sigma_from_logits_default_is_the_reference_parametrisation_bit_for_bit():
    z = torch.linspace(-6, 6, 1001)
    assert torch.equal(fk.sigma_from_logits(z), torch.pow(3.0, torch.sigmoid(5.0 * z) + 1e-5) - 1.0)
    torch.manual_seed(0)
    m = fk.I2Correlation(16, 2, (3, 4), backend="reference")
    x = torch.randn(2, 12, 16)
    want = (torch.pow(3.0, torch.sigmoid(5.0 * m.intra_sigma(x)) + 1e-5) - 1.0).view(2, 12, 2, 2).transpose(1, 2)
    assert torch.equal(m._sigma(m.intra_sigma, x), want)


@pytest.mark.parametrize("sigma_max", [0.5, 2.0, 8.0, 40.0])
def test_sigma_max_bounds_the_widths(sigma_max):
    z = torch.linspace(-30, 30, 2001, dtype=torch.float64)
    s = fk.sigma_from_logits(z, sigma_max)
    assert (s.diff() >= 0).all() and s.min() > 0
    torch.testing.assert_close(s.max(), torch.tensor((1 + sigma_max) ** (1 + 1e-5) - 1, dtype=torch.float64))
    assert s.max() <= sigma_max * (1 + 5e-5)
    torch.testing.assert_close(s[1000], torch.tensor((1 + sigma_max) ** (0.5 + 1e-5) - 1, dtype=torch.float64))
    m = fk.I2Correlation(16, 2, (3, 4), backend="reference", sigma_max=sigma_max)
    assert m._sigma(m.intra_sigma, 100 * torch.randn(2, 12, 16)).max() <= sigma_max * (1 + 5e-5)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), "2"])
def test_bad_sigma_max(bad):
    with pytest.raises(ValueError, match="sigma_max"):
        fk.I2Correlation(16, 2, (3, 4), sigma_max=bad)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_kl_with_full_gradient(backend):
    """The documented recipe kl_attn + kl_prior - kl_attn.detach() is K with its true gradient (q, k and sigma)."""
    if backend == "cpu" and not HAS_CPU:
        pytest.skip("cpu backend not built")
    q, k, v, s = (t.double().requires_grad_() for t in good(Bk=2))
    _, st = call(q, k, v, s, backend=backend)
    full = st.kl_attn + st.kl_prior - st.kl_attn.detach()
    torch.testing.assert_close(full, st.kl_attn)
    got = torch.autograd.grad(full.sum(), (q, k, s))
    from fod_kernels.reference import prior_log_weights
    p = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)
    t = torch.softmax(prior_log_weights(s, 3, 4), -1)
    lp, lt = torch.log(p + 1e-4), torch.log(t + 1e-4)
    K = (p * (lp - lt)).sum(-1) + (t * (lt - lp)).sum(-1)  # no detach anywhere
    for a, b in zip(got, torch.autograd.grad(K.sum(), (q, k, s))):
        torch.testing.assert_close(a, b)
