"""Mixed precision: a bfloat16/float16 module and torch.autocast, forward and backward.

sigma is computed in float32 whatever the module's dtype (in bfloat16, 3 ** 1e-5 rounds to 1 and sigma to
0), the functional API takes float32 sigma with low-precision q, k, v, and the statistics are float32.
Accuracy follows FlashAttention's rule (tests/helpers.py): the error of the low-precision kernel path
against float64 is at most a small multiple of the error of the same-precision reference path."""
import copy

import pytest
import torch

import fod_kernels as fk
from helpers import assert_fa_rule, make_branch, upstream, values_and_grads, backend_fn, reference_fn

HAS_CPU = fk.available_backends()["cpu"].available
CPU_BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU, reason="cpu not built"))]
TRITON = pytest.param("triton", marks=pytest.mark.skipif(not fk.available_backends()["triton"].available,
                                                         reason="triton unavailable"))
GRID = (4, 5)
LOW = [torch.bfloat16, torch.float16]


def test_sigma_is_float32_in_a_bfloat16_module():
    """Was: sigma underflowed to 0 in bfloat16 ("sigma must be > 0", or NaN with check_values=False)."""
    m = fk.I2Correlation(16, 2, GRID, backend="reference").bfloat16()
    x = torch.randn(2, 20, 16, dtype=torch.bfloat16)
    s = m._sigma(m.intra_sigma, x)
    assert s.dtype == torch.float32 and bool((s > 0).all())
    with torch.no_grad():
        m.intra_sigma.weight.zero_()
        m.intra_sigma.bias.fill_(-5.0)  # sigmoid(-25) ~ 1e-11: sigma ~ 1.1e-5 tokens, 0 in bfloat16
    assert bool((m._sigma(m.intra_sigma, x) > 1e-6).all())


def _module_results(m, x, ref, autocast_dtype=None):
    """h, both branches' statistics, and every parameter's gradient, in float64."""
    m.zero_grad()
    x = x.detach().clone().requires_grad_()
    dev = x.device.type
    ctx = torch.autocast(dev, autocast_dtype) if autocast_dtype else torch.autocast(dev, enabled=False)
    with ctx:
        h, si, se = m(x, ref)
        assert si.kl_attn.dtype in (torch.float32, torch.float64)
        w = torch.randn(h.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(x.device)
        loss = ((h.double() * w).sum() + (si.kl_prior - si.kl_attn - 0.5 * si.entropy).double().sum()
                + (se.kl_attn - se.kl_prior + 0.5 * se.entropy).double().sum())
    loss.backward()
    res = {"h": h, "K_intra": si.kl_attn, "E_intra": si.entropy, "K_inter": se.kl_attn, "dx": x.grad}
    res.update({n: p.grad for n, p in m.named_parameters()})
    return {k: v.detach().double().cpu() for k, v in res.items()}


def _modules(seed=0, d=32, heads=4):
    torch.manual_seed(seed)
    m = fk.I2Correlation(d, heads, GRID, backend="reference")
    x, ref = torch.randn(2, 20, d), torch.randn(1, 20, d)
    return m, x, ref


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_module_forward_backward(backend, dtype):
    """m.to(bf16/fp16): h, statistics and all gradients within the FA rule of the float64 module."""
    m, x, ref = _modules()
    lp = copy.deepcopy(m).to(dtype)
    x, ref = x.to(dtype), ref.to(dtype)
    m64 = copy.deepcopy(lp).double()  # the same (rounded) weights and inputs, computed in float64
    oracle = _module_results(m64, x.double(), ref.double())
    lp.backend = "reference"
    same_precision = _module_results(lp, x, ref)
    lp.backend = backend
    got = _module_results(lp, x, ref)
    assert_fa_rule(got, same_precision, oracle, dtype, names=tuple(oracle), floor_ulps=1.0, label=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_cpu_bfloat16_forward_backward(backend):
    m, x, ref = _modules(seed=1)
    oracle = _module_results(copy.deepcopy(m).double(), x.double(), ref.double())
    same_precision = _module_results(m, x, ref, torch.bfloat16)
    m.backend = backend
    got = _module_results(m, x, ref, torch.bfloat16)
    assert_fa_rule(got, same_precision, oracle, torch.bfloat16, names=tuple(oracle), floor_ulps=1.0, label=backend)
    with torch.autocast("cpu", torch.bfloat16):
        h, si, _ = m(x, ref)
    assert h.dtype == torch.bfloat16 and si.kl_attn.dtype == torch.float32


@pytest.mark.parametrize("backend", CPU_BACKENDS + [TRITON])
@pytest.mark.parametrize("dtype", LOW)
def test_functional_float32_sigma_with_low_precision_qkv(backend, dtype):
    q, k, v, s = make_branch(2, 2, 20, 16, 1, seed=3)
    ups = upstream(q, seed=4)
    got = values_and_grads(backend_fn(backend, GRID, 1e-4), (q.to(dtype), k.to(dtype), v.to(dtype), s), ups)
    same = values_and_grads(reference_fn(GRID, 1e-4), (q.to(dtype), k.to(dtype), v.to(dtype), s), ups)
    rounded = tuple(t.to(dtype).double() for t in (q, k, v))  # the same inputs, computed in float64
    oracle = values_and_grads(reference_fn(GRID, 1e-4), rounded + (s.double(),), ups)
    assert_fa_rule(got, same, oracle, dtype, floor_ulps=1.0, label=f"{backend} {dtype}")
    out, st = fk.correlation_attention(q.to(dtype), k.to(dtype), v.to(dtype), s.requires_grad_(), GRID, backend=backend)
    assert out.dtype == dtype and st.kl_attn.dtype == torch.float32
    st.kl_prior.sum().backward()
    assert s.grad.dtype == torch.float32


def test_sigma_of_another_dtype_is_an_error():
    q, k, v, s = make_branch(1, 2, 20, 8, 1, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="sigma must be float32 or q's dtype"):
        fk.correlation_attention(q, k, v, s.double(), GRID, backend="reference")


# ---------------------------------------------------------------- GPU (skipped without a CUDA device)

def _gpu_backends():
    st = fk.available_backends()
    return [b for b in ("cuda", "triton") if st[b].available]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW)
def test_gpu_autocast_and_low_precision_module(dtype):
    backends = _gpu_backends()
    if not backends:
        pytest.skip("no GPU kernel backend available")
    m, x, ref = _modules(seed=2)
    m, x, ref = m.cuda(), x.cuda(), ref.cuda()
    oracle = _module_results(copy.deepcopy(m).double(), x.double(), ref.double())
    same_precision = _module_results(m, x, ref, dtype)
    for backend in backends:
        m.backend = backend
        got = _module_results(m, x, ref, dtype)
        assert_fa_rule(got, same_precision, oracle, dtype, names=tuple(oracle), floor_ulps=1.0,
                       label=f"autocast cuda {backend} {dtype}")
    lp = copy.deepcopy(m).to(dtype)
    lp.backend = "reference"
    oracle = _module_results(copy.deepcopy(lp).double(), x.to(dtype).double(), ref.to(dtype).double())
    same_precision = _module_results(lp, x.to(dtype), ref.to(dtype))
    for backend in backends:
        lp.backend = backend
        got = _module_results(lp, x.to(dtype), ref.to(dtype))
        assert_fa_rule(got, same_precision, oracle, dtype, names=tuple(oracle), floor_ulps=1.0,
                       label=f"{dtype} module {backend}")
