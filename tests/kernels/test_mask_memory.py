"""key_padding_mask and a memory of m reference images (S = m * L): the reference backend against an
independent explicit float64 computation, properties that tie them to the unmasked single-image operator,
and that every backend takes them. The kernels' own property tests against the reference are in
test_mask_memory_kernels.py (the cuda kernels' simulation: test_cuda_sim.py)."""
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fod_kernels as fk
import fod_kernels.functional as F
from fod_kernels.reference import correlation_reference
from helpers import make_branch, upstream

HAS_CPU = fk.available_backends()["cpu"].available
GRIDS = [(1, 5), (3, 4), (4, 3), (2, 6)]


def explicit(q, k, v, sigma, grid, eps, mask):
    """The masked, m-image operator written out: keep-weights multiply exp(...), then divide by the sum."""
    rows, cols = grid
    L, S = rows * cols, k.shape[2]
    keep = torch.ones(1, S, dtype=q.dtype) if mask is None else (~mask).to(q.dtype)
    keep = keep[:, None, None, :]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    e = torch.exp(s - s.max(-1, keepdim=True).values) * keep
    p = e / e.sum(-1, keepdim=True)
    i, j = torch.arange(L), torch.arange(S) % L  # key j sits at position j % L of its image
    dy = (i // cols)[:, None] - (j // cols)[None, :]
    dx = (i % cols)[:, None] - (j % cols)[None, :]
    sy, sx = sigma[..., 0:1], sigma[..., 1:2]
    g = torch.exp(-dy ** 2 / (2 * sy ** 2) - dx ** 2 / (2 * sx ** 2)) / (2 * math.pi * sy * sx) * keep
    t = g / g.sum(-1, keepdim=True)
    on = keep > 0
    lp = torch.where(on, torch.log(torch.where(on, p, 1.0) + eps), 0.0)
    lt = torch.where(on, torch.log(torch.where(on, t, 1.0) + eps), 0.0)

    def K(p_, lp_, t_, lt_):
        return (p_ * (lp_ - lt_)).sum(-1) + (t_ * (lt_ - lp_)).sum(-1)

    return (p @ v, K(p, lp, t.detach(), lt.detach()), K(p.detach(), lp.detach(), t, lt), -(p * lp).sum(-1))


def random_mask(Bm, S, seed, frac=0.4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(Bm, S, generator=g) < frac
    mask[torch.arange(Bm), torch.randint(S, (Bm,), generator=g)] = False  # every row keeps a key
    return mask


def grads_of(fn, leaves, ups):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out, kla, klp, ent = fn(*leaves)
    g_out, a, b, e = ups
    loss = (out * g_out).sum() + (kla * a).sum() + (klp * b).sum() + (ent * e).sum()
    return [out, kla, klp, ent, *torch.autograd.grad(loss, leaves)]


@settings(max_examples=30, deadline=None)
@given(grid=st.sampled_from(GRIDS), B=st.integers(1, 3), m=st.integers(1, 3), shared=st.booleans(),
       mask_kind=st.sampled_from(["none", "shared", "per_batch"]), eps=st.sampled_from([1e-4, 0.0]),
       seed=st.integers(0, 2 ** 16))
def test_reference_equals_explicit_masked_multi_image_operator(grid, B, m, shared, mask_kind, eps, seed):
    L = grid[0] * grid[1]
    q, _, _, sigma = make_branch(B, 2, L, 4, B, dtype=torch.float64, seed=seed, sigma_lo=0.3)
    g = torch.Generator().manual_seed(seed + 1)
    k, v = (torch.randn(1 if shared else B, 2, m * L, 4, generator=g, dtype=torch.float64) for _ in range(2))
    mask = None if mask_kind == "none" else random_mask(1 if mask_kind == "shared" else B, m * L, seed)
    ups = upstream(q, seed=seed + 2)
    got = grads_of(lambda *a: correlation_reference(*a, grid, eps=eps, key_padding_mask=mask), (q, k, v, sigma), ups)
    want = grads_of(lambda *a: explicit(*a, grid, eps, mask), (q, k, v, sigma), ups)
    for n, x, y in zip(("out", "kl_attn", "kl_prior", "entropy", "dq", "dk", "dv", "dsigma"), got, want):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9, msg=lambda s, n=n: f"{n}: {s}")
    if mask is not None:  # a key masked for every query that reads it gets no gradient
        full = mask.expand(B, -1)
        km = (full if k.shape[0] == B else full.all(0, keepdim=True))[:, None, :, None]
        for d in got[5:7]:
            assert (d * km).abs().max() == 0 and (d * ~km).abs().max() > 0


@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_masking_whole_images_equals_leaving_them_out(eps):
    """Memory of 3 images with image 1 masked == memory of images 0 and 2, unmasked: the prior is renormalised."""
    grid, L = (3, 4), 12
    q, _, _, sigma = make_branch(2, 2, L, 8, 2, dtype=torch.float64, seed=4, sigma_lo=0.3)
    k, v = (torch.randn(1, 2, 3 * L, 8, dtype=torch.float64) for _ in range(2))
    mask = torch.zeros(1, 3 * L, dtype=torch.bool)
    mask[:, L:2 * L] = True
    keep = torch.cat([torch.arange(L), torch.arange(2 * L, 3 * L)])
    a = correlation_reference(q, k, v, sigma, grid, eps=eps, key_padding_mask=mask)
    b = correlation_reference(q, k[:, :, keep], v[:, :, keep], sigma, grid, eps=eps)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_identical_images_in_the_memory_change_nothing_at_eps_zero():
    """m copies of one image: p and t split evenly over the copies, so out and (with exact logs) K, E's
    differences cancel: out and K equal the single-image operator's."""
    grid, L = (4, 3), 12
    q, k, v, sigma = make_branch(2, 2, L, 8, 1, dtype=torch.float64, seed=6, sigma_lo=0.3)
    one = correlation_reference(q, k, v, sigma, grid, eps=0.0)
    three = correlation_reference(q, k.repeat(1, 1, 3, 1), v.repeat(1, 1, 3, 1), sigma, grid, eps=0.0)
    torch.testing.assert_close(three[0], one[0])
    torch.testing.assert_close(three[1], one[1])
    torch.testing.assert_close(three[3], one[3] + math.log(3))  # the entropy of an even split over 3 copies


def test_functional_and_module_pass_the_mask_and_memory():
    grid, L = (3, 4), 12
    q, k, v, sigma = make_branch(2, 2, L, 8, 2, seed=1)
    mk, mv = torch.randn(1, 2, 2 * L, 8), torch.randn(1, 2, 2 * L, 8)
    mask, mask_ref = random_mask(2, L, 1), random_mask(1, 2 * L, 2)
    oi, oe, si, se = fk.i2correlation(q, k, v, sigma, q, mk, mv, sigma, grid, backend="reference",
                                      key_padding_mask=mask, key_padding_mask_ref=mask_ref)
    want_i = correlation_reference(q, k, v, sigma, grid, key_padding_mask=mask)
    want_e = correlation_reference(q, mk, mv, sigma, grid, key_padding_mask=mask_ref)
    torch.testing.assert_close(oi, want_i[0])
    torch.testing.assert_close(se.kl_attn, want_e[1])
    m = fk.I2Correlation(16, 2, grid, backend="reference")
    h, si, se = m(torch.randn(2, L, 16), torch.randn(1, 3 * L, 16), key_padding_mask=mask,
                  key_padding_mask_ref=random_mask(2, 3 * L, 3))
    assert h.shape == (2, L, 16) and torch.isfinite(h).all() and se.kl_attn.shape == (2, 2, L)
    with pytest.raises(ValueError, match="multiple of 12"):
        m(torch.randn(2, L, 16), torch.randn(1, 2 * L + 1, 16))


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda m: m.float(), TypeError, "bool tensor"),
    (lambda m: m[:, :5], ValueError, r"\(1 or B=2, S=12\)"),
    (lambda m: m.repeat(3, 1)[:3], ValueError, r"\(1 or B=2, S=12\)"),
    (lambda m: torch.ones_like(m), ValueError, "masks every key"),
])
def test_bad_masks(mutate, exc, words):
    q, k, v, sigma = make_branch(2, 2, 12, 8, 1, seed=1)
    with pytest.raises(exc, match=words):
        fk.correlation_attention(q, k, v, sigma, (3, 4), backend="reference",
                                 key_padding_mask=mutate(random_mask(2, 12, 0)))


def test_every_backend_takes_masks_and_memories():
    """Since the cuda kernels have their extended variant, every backend implements them: 'auto' never
    diverts such a call, and an explicit backend fails (where it fails) for the same reason as without them."""
    from fod_kernels._backends import BACKENDS
    assert set(F.EXTENDED_BACKENDS) == set(BACKENDS)
    q, k, v, sigma = make_branch(2, 2, 12, 8, 1, seed=1)
    mask = random_mask(2, 12, 0)
    k2, v2 = k.repeat(1, 1, 2, 1), v.repeat(1, 1, 2, 1)
    ok, why = fk.available_backends()["cuda"]
    expected = why if not ok else "cannot run on cpu"  # CPU tensors
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        fk.correlation_attention(q, k, v, sigma, (3, 4), backend="cuda", key_padding_mask=mask)
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        fk.correlation_attention(q, k2, v2, sigma, (3, 4), backend="cuda")


def test_a_backend_without_masks_would_refuse(monkeypatch):
    """The guard for a future backend outside EXTENDED_BACKENDS: a clear error, never a silent wrong answer."""
    q, k, v, sigma = make_branch(2, 2, 12, 8, 1, seed=1)
    monkeypatch.setattr(F, "EXTENDED_BACKENDS", ("reference",))
    monkeypatch.setattr(F, "resolve_backend_name", lambda backend, device_type: "cpu")
    with pytest.raises(NotImplementedError, match=r"key_padding_mask is not implemented by the 'cpu' backend"):
        fk.correlation_attention(q, k, v, sigma, (3, 4), key_padding_mask=random_mask(2, 12, 0))
    with pytest.raises(NotImplementedError, match=r"several images"):
        fk.correlation_attention(q, k.repeat(1, 1, 2, 1), v.repeat(1, 1, 2, 1), sigma, (3, 4))
