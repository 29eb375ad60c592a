"""PyTorch transforms through the operator: each one is exact (against the reference backend) or refused
with an error naming backend="reference" -- never a silent wrong result. These tests make docs/operator.md's
table "which transforms each backend supports" true. The GPU backends (cuda, triton) share the wrapper of
fod_kernels/_custom_op.py with the cpu backend, so their cells follow from the cpu rows; triton also runs
a few of them here under its interpreter."""
import io
import warnings

import pytest
import torch
from torch.func import functional_call, grad, jvp, vmap
from torch.utils.checkpoint import checkpoint

import fod_kernels as fk
from helpers import make_branch

HAS_CPU = fk.available_backends()["cpu"].available
HAS_TRITON = fk.available_backends()["triton"].available
KERNELS = [pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU, reason="cpu backend not built"))]
ALL = ["reference"] + KERNELS
GRID = (3, 4)
TRITON = pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable"))


def branch(Bk=1, dtype=torch.float64, seed=0, L=12, D=8):
    return make_branch(2, 2, L, D, Bk, dtype=dtype, seed=seed, sigma_lo=0.3)


def scalar_fn(backend, k, v, s, grid=GRID):
    """q -> a scalar of every output whose gradient route to q is its true derivative (kl_prior's is 0)."""
    def f(q):
        out, st = fk.correlation_attention(q, k, v, s, grid, backend=backend)
        return out.square().sum() + (st.kl_attn - 0.5 * st.entropy).sum()
    return f


def all_outputs(backend, *br, grid=GRID):
    out, st = fk.correlation_attention(*br, grid, backend=backend)
    return out, st.kl_attn, st.kl_prior, st.entropy


def close(a, b, **kw):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **kw)


# ---------------------------------------------------------------- forward-mode AD (jvp)

def test_reference_jvp_matches_finite_differences():
    q, k, v, s = branch()
    t = torch.randn_like(q)
    f = scalar_fn("reference", k, v, s)
    _, tangent = jvp(f, (q,), (t,))
    h = 1e-6
    fd = (f(q + h * t) - f(q - h * t)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", KERNELS + [TRITON])
def test_kernel_jvp_is_refused_not_zero(backend):
    """torch.func.jvp through a kernel used to return a zero tangent (the custom op had no jvp rule)."""
    q, k, v, s = branch(dtype=torch.float32)
    f = scalar_fn(backend, k, v, s)
    with pytest.raises(RuntimeError, match='forward-mode AD.*backend="reference"'):
        jvp(f, (q,), (torch.randn_like(q),))


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_forward_ad_is_refused(backend):
    import torch.autograd.forward_ad as fwAD
    q, k, v, s = branch()
    with fwAD.dual_level():
        dual = fwAD.make_dual(s, torch.randn_like(s))  # a tangent on sigma alone
        with pytest.raises(RuntimeError, match='forward-mode AD.*backend="reference"'):
            fk.correlation_attention(q, k, v, dual, GRID, backend=backend)


# ---------------------------------------------------------------- double backward

def test_reference_double_backward_is_exact():
    q, k, v, s = branch()
    f = scalar_fn("reference", k, v, s)
    qq = q.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(qq), qq, create_graph=True)
    t = torch.randn_like(q)
    (hvp,) = torch.autograd.grad((g * t).sum(), qq)
    h = 1e-6
    fd = (grad(f)(q + h * t) - grad(f)(q - h * t)) / (2 * h)
    torch.testing.assert_close(hvp, fd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNELS + [TRITON])
def test_kernel_double_backward_is_refused(backend):
    q, k, v, s = branch(dtype=torch.float32)
    f = scalar_fn(backend, k, v, s)
    qq = q.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(qq), qq, create_graph=True)  # first order with a graph: allowed
    torch.testing.assert_close(g, grad(scalar_fn("reference", k, v, s))(q), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match='double backward.*backend="reference"'):
        g.sum().backward()
    with pytest.raises(RuntimeError, match='double backward.*backend="reference"'):
        grad(lambda x: grad(f)(x).sum())(q)


# ---------------------------------------------------------------- torch.func.grad, functional_call

@pytest.mark.parametrize("backend", KERNELS + [TRITON])
def test_func_grad_matches_reference(backend):
    dt = torch.float32 if backend == "triton" else torch.float64
    q, k, v, s = branch(dtype=dt)
    got = grad(scalar_fn(backend, k, v, s))(q)
    want = grad(scalar_fn("reference", k, v, s))(q)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", KERNELS)
def test_jacrev_matches_reference(backend):
    """jacrev = vmap over vjp: the backward op under vmap, with a per-row cotangent."""
    from torch.func import jacrev
    q, k, v, s = branch()
    f = lambda be: lambda q_: all_outputs(be, q_, k, v, s)[1]  # noqa: E731  (kl_attn, (B, H, L))
    torch.testing.assert_close(jacrev(f(backend))(q), jacrev(f("reference"))(q))


@pytest.mark.parametrize("backend", KERNELS)
def test_functional_call_parameter_gradients(backend):
    torch.manual_seed(0)
    m = fk.I2Correlation(16, 2, GRID, backend=backend).double()
    x, ref = torch.randn(2, 12, 16, dtype=torch.float64), torch.randn(1, 12, 16, dtype=torch.float64)
    params = {n: p.detach() for n, p in m.named_parameters()}

    def loss(p, backend_):
        m.backend = backend_
        h, si, se = functional_call(m, p, (x, ref))
        return h.square().mean() + (si.kl_prior - si.kl_attn - si.entropy + se.kl_attn).mean()

    got, want = grad(loss)(params, backend), grad(loss)(params, "reference")
    for n in params:
        torch.testing.assert_close(got[n], want[n], msg=n)


# ---------------------------------------------------------------- vmap

@pytest.mark.parametrize("backend", KERNELS + [TRITON])
@pytest.mark.parametrize("case", ["all", "shared_memory", "batched_memory_only", "dim1"])
def test_vmap_equals_a_loop(backend, case):
    dt = torch.float32 if backend == "triton" else torch.float64
    V = 3
    qs, ks, vs, ss = zip(*(branch(Bk=1 if case != "all" else 2, dtype=dt, seed=i) for i in range(V)))
    q, k, v, s = (torch.stack(t) for t in (qs, ks, vs, ss))
    if case == "all":
        args, dims = (q, k, v, s), (0, 0, 0, 0)
    elif case == "shared_memory":  # a memory shared by the batch and by every vmapped call
        args, dims = (q, k[0], v[0], s), (0, None, None, 0)
    elif case == "batched_memory_only":  # one query batch against V memories
        args, dims = (q[0], k, v, s[0]), (None, 0, 0, None)
    else:
        args, dims = (q.movedim(0, 1), k, v, s.movedim(0, 1)), (1, 0, 0, 1)
    got = vmap(lambda *a: all_outputs(backend, *a), in_dims=dims)(*args)
    for i in range(V):
        one = [a.select(d, i) if d is not None else a for a, d in zip(args, dims)]
        close([g[i] for g in got], all_outputs("reference", *one), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", KERNELS + [TRITON])
@pytest.mark.parametrize("memory", ["shared", "per_call"])
def test_vmap_of_grad_per_sample_gradients(backend, memory):
    """Per-sample gradients w.r.t. everything: vmap(grad) runs the backward op under vmap too."""
    dt = torch.float32 if backend == "triton" else torch.float64
    q, k, v, s = branch(Bk=1, dtype=dt)
    V = 3
    qv = torch.stack([q * (1 + 0.1 * i) for i in range(V)])
    kv = torch.stack([k * (1 - 0.1 * i) for i in range(V)])

    def loss(be):
        def f(q_, k_, v_, s_):
            out, st = fk.correlation_attention(q_, k_, v_, s_, GRID, backend=be)
            return out.square().sum() + (st.kl_attn - st.entropy + 0.5 * st.kl_prior).sum()
        return f

    dims = (0, 0 if memory == "per_call" else None, None, None)
    kk = kv if memory == "per_call" else k
    got = vmap(grad(loss(backend), argnums=(0, 1, 2, 3)), in_dims=dims)(qv, kk, v, s)
    want = vmap(grad(loss("reference"), argnums=(0, 1, 2, 3)), in_dims=dims)(qv, kk, v, s)
    close(got, want, rtol=1e-4, atol=1e-4)
    assert got[1].shape == (V, *k.shape)


def test_vmap_scans_values_of_every_slice():
    q, k, v, s = branch()
    s = torch.stack([s, s.clone()])
    s[1, 0, 0, 0, 0] = -1.0
    with pytest.raises(ValueError, match="sigma must be > 0"):
        vmap(lambda s_: all_outputs("reference", q, k, v, s_))(s)


# ---------------------------------------------------------------- torch.compile, torch.export, jit.trace

class Wrapped(torch.nn.Module):
    """A model around the layer whose outputs are plain tensors (what export and jit.trace return)."""

    def __init__(self, backend):
        super().__init__()
        torch.manual_seed(0)
        self.layer = fk.I2Correlation(16, 2, GRID, backend=backend)
        self.head = torch.nn.Linear(16, 16)

    def forward(self, x, ref):
        h, si, se = self.layer(x, ref)
        return self.head(h), si.kl_attn, si.kl_prior, se.entropy


def _loss(outs):
    y, kla, klp, ent = outs
    return y.square().sum() + kla.sum() - 0.5 * klp.sum() + ent.sum()


@pytest.mark.parametrize("backend", ALL)
def test_torch_compile_fullgraph_forward_and_backward(backend):
    m = Wrapped(backend)
    x, ref = torch.randn(2, 12, 16, requires_grad=True), torch.randn(1, 12, 16)
    eager = m(x, ref)
    (gx,) = torch.autograd.grad(_loss(eager), x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x, ref)
    (gc,) = torch.autograd.grad(_loss(compiled), x)
    close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gc, gx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ALL + [TRITON])
def test_export_with_a_dynamic_batch(backend):
    """torch.export with Dim batch; the program (also saved and loaded) gives the eager result at other batches."""
    from torch.export import Dim, export
    m = Wrapped(backend)
    ref = torch.randn(1, 12, 16)
    ep = export(m, (torch.randn(3, 12, 16), ref), dynamic_shapes={"x": {0: Dim("batch")}, "ref": None})
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    for B in (2, 5):
        x = torch.randn(B, 12, 16)
        close(loaded(x, ref), m(x, ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ALL + [TRITON])
def test_jit_trace(backend):
    """torch.jit.trace records the op (not a Python call): it runs at other batch sizes, differentiates, saves."""
    m = Wrapped(backend)
    ref = torch.randn(1, 12, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.trace's deprecation and shape-to-bool warnings
        traced = torch.jit.trace(m, (torch.randn(3, 12, 16), ref), check_trace=False, strict=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
    for B in (2, 5):
        x = torch.randn(B, 12, 16, requires_grad=True)
        got, want = loaded(x, ref), m(x, ref)
        close(got, want, rtol=1e-6, atol=1e-6)
        (g1,) = torch.autograd.grad(_loss(got), x)
        (g2,) = torch.autograd.grad(_loss(want), x)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- activation checkpointing

def _layer_grads(m, x, ref, wrap):
    m.zero_grad()
    h, si, se = wrap(m, x, ref)
    (h.square().mean() + si.kl_prior.mean() - si.kl_attn.mean() - si.entropy.mean() + se.kl_attn.mean()
     - se.kl_prior.mean() + se.entropy.mean()).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("backend", ALL)
def test_non_reentrant_checkpoint_is_exact(backend):
    torch.manual_seed(0)
    m = fk.I2Correlation(16, 2, GRID, backend=backend).double()
    x, ref = torch.randn(2, 12, 16, dtype=torch.float64), torch.randn(1, 12, 16, dtype=torch.float64)
    plain = _layer_grads(m, x, ref, lambda m_, *a: m_(*a))
    ckpt = _layer_grads(m, x, ref, lambda m_, *a: checkpoint(m_, *a, use_reentrant=False))
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], msg=n)


@pytest.mark.parametrize("backend", ALL)
def test_reentrant_checkpoint_with_statistics_is_refused(backend):
    """Reentrant checkpointing used to drop the statistics' gradients silently (they sit in named tuples)."""
    torch.manual_seed(0)
    m = fk.I2Correlation(16, 2, GRID, backend=backend).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(1, 12, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        _layer_grads(m, x, ref, lambda m_, *a: checkpoint(m_, *a, use_reentrant=True))
    # without statistics reentrant checkpointing is exact, and allowed
    plain = torch.autograd.grad(m(x, ref, (False, False))[0].square().sum(), x)[0]
    x.grad = None
    checkpoint(lambda x_: m(x_, ref, (False, False))[0], x, use_reentrant=True).square().sum().backward()
    torch.testing.assert_close(x.grad, plain)


def test_inference_under_no_grad_is_not_mistaken_for_checkpointing():
    m = fk.I2Correlation(16, 2, GRID, backend="reference")
    with torch.no_grad():
        h, si, se = m(torch.randn(2, 12, 16), torch.randn(1, 12, 16))
    assert si.kl_attn.shape == (2, 2, 12)
