"""Two properties every backend shares (issue 20, item 9).

1. Meta tensors: the operator (functional and module, with and without autocast) infers the shapes and
   dtypes of its results without data, as torch.compile's tracing and FSDP's meta-device initialisation need.
   Each kernel backend's op has a meta kernel, so backend="cpu"/"triton"/"cuda" give shapes too.
2. ``requires_grad`` of the results follows autograd's rule for the formulas, in every backend, as the
   reference (plain autograd) has it: out needs q, k or v; kl_attn and entropy need q or k; kl_prior needs
   sigma. A kernel backend must not mark a result as requiring grad (with a gradient of 0) when it has none.
"""
import itertools

import pytest
import torch

import fod_kernels as fk
from fod_kernels import backend_cuda
from helpers import make_branch

HAS_CPU = fk.available_backends()["cpu"].available
HAS_TRITON = fk.available_backends()["triton"].available
CPU = pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU, reason="cpu backend not built"))
TRITON = pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable"))
GRID = (3, 4)
L = GRID[0] * GRID[1]


def _meta(t):
    return t.to("meta")


def _results(res):
    out, st = res
    return [out] + ([] if st is None else list(st))


@pytest.mark.parametrize("backend", ["auto", "reference", CPU, TRITON])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need", [True, False])
@pytest.mark.parametrize("m_images", [1, 2])
def test_meta_tensors_give_shapes_and_dtypes(backend, dtype, need, m_images):
    B, H, D = 2, 3, 8
    q, _, _, s = make_branch(B, H, L, D, 1, dtype=dtype)
    k, v = (torch.randn(1, H, m_images * L, D, dtype=dtype) for _ in range(2))
    mask = torch.zeros(B, m_images * L, dtype=torch.bool)
    mask[:, 0] = True
    meta = [_meta(t) for t in (q, k, v, s)]
    want = _results(fk.correlation_attention(q, k, v, s, GRID, backend="reference", need_stats=need,
                                             key_padding_mask=mask))
    got = _results(fk.correlation_attention(*meta, GRID, backend=backend, need_stats=need,
                                            key_padding_mask=_meta(mask)))
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want]
    assert all(t.device.type == "meta" for t in got)
    res = fk.i2correlation(*meta, *meta, GRID, backend=backend, need_stats=need)
    assert len(res) == 4 and res.out_intra.shape == res.out_inter.shape == q.shape
    assert (res.stats_intra is None) == (not need)


def test_meta_tensors_in_the_cuda_op():
    """The cuda backend's op on meta tensors: its meta kernel needs neither the extension nor a GPU."""
    q, k, v, s = (_meta(t) for t in make_branch(2, 2, L, 8, 1, dtype=torch.float16))
    (out, kla, klp, ent), = backend_cuda.run([(q, k, v, s.float())], *GRID, 8 ** -0.5, 1e-4, [True])
    assert out.shape == q.shape and out.dtype == torch.float16 and out.device.type == "meta"
    assert all(t.shape == q.shape[:3] and t.dtype == torch.float32 for t in (kla, klp, ent))


@pytest.mark.parametrize("backend", ["auto", "reference", CPU])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("branches", [("intra", "inter"), ("intra",)])
def test_module_on_meta_device(backend, autocast, branches):
    """FSDP-style meta initialisation: the layer built on the meta device runs a forward (shape inference),
    then to_empty() + reset gives a working layer; autocast on the inputs' device does not stop it."""
    with torch.device("meta"):
        layer = fk.I2Correlation(16, 2, GRID, backend=backend, branches=branches)
    x = torch.empty(2, L, 16, device="meta")
    ref = torch.empty(1, 2 * L, 16, device="meta")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h, si, se = layer(x, ref)
    assert h.shape == x.shape and h.device.type == "meta"
    assert si.kl_attn.shape == (2, 2, L) and si.kl_attn.dtype == torch.float32
    assert (se is None) == ("inter" not in branches)
    layer.to_empty(device="cpu")
    for mod in layer.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.reset_parameters()
    h, _, _ = layer(torch.randn(2, L, 16), torch.randn(1, 2 * L, 16))
    assert h.shape == (2, L, 16) and torch.isfinite(h).all()


# requires_grad of (out, kl_attn, kl_prior, entropy) for each set of inputs that require grad
def _rule(q, k, v, s):
    return (q or k or v, q or k, s, q or k)


SUBSETS = [c for c in itertools.product([False, True], repeat=4) if any(c)]


@pytest.mark.parametrize("backend", ["reference", CPU, TRITON])
@pytest.mark.parametrize("needs", SUBSETS, ids=lambda c: "".join("qkvs"[i] for i in range(4) if c[i]))
def test_requires_grad_follows_the_formulas(backend, needs):
    br = [t.detach().requires_grad_(n) for t, n in zip(make_branch(1, 2, L, 8, 1, dtype=torch.float32), needs)]
    res = _results(fk.correlation_attention(*br, GRID, backend=backend))
    assert tuple(t.requires_grad for t in res) == _rule(*needs)
    res_i2 = fk.i2correlation(*br, *br, GRID, backend=backend)
    got = [t.requires_grad for t in (res_i2[0], *res_i2[2])] + [t.requires_grad for t in (res_i2[1], *res_i2[3])]
    assert tuple(got) == _rule(*needs) * 2
    # and the results that do require grad take a backward to the inputs that do
    loss = sum(t.sum() for t in res if t.requires_grad)
    loss.backward()
    assert all(t.grad is not None for t, n in zip(br, needs) if n)


@pytest.mark.skipif(not HAS_CPU, reason="cpu backend not built")
@pytest.mark.parametrize("needs", SUBSETS, ids=lambda c: "".join("qkvs"[i] for i in range(4) if c[i]))
def test_requires_grad_rule_in_the_ops_autograd_formula(needs):
    """The op's own autograd formula (what torch.compile and torch.jit.trace record) follows the same rule."""
    from fod_kernels import backend_cpu
    br = [t.detach().requires_grad_(n) for t, n in zip(make_branch(1, 2, L, 8, 1), needs)]
    none = torch.empty((0,), dtype=torch.bool)
    res = backend_cpu.run.fwd_op("cpu", *([t] for t in br), *GRID, 8 ** -0.5, 1e-4, [1], [none])
    assert tuple(t.requires_grad for t in res[:4]) == _rule(*needs)
