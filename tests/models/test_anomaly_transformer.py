"""fod_kernels.models.AnomalyTransformer against the official Anomaly Transformer's semantics.

The oracle below is written here from the official code's semantics (thuml/Anomaly-Transformer, model/ and
solver.py): it materialises the B x H x L x L series and (unnormalised) prior per layer, normalises the prior
by its row sum, takes my_kl_loss = mean over heads of sum_j p (log(p + 1e-4) - log(q + 1e-4)), trains with
two backward passes (loss1 = rec - k * series_loss with the prior detached, loss2 = rec + k * prior_loss with
the series detached, accumulated), and scores with softmax(-(series_loss + prior_loss) * T) * MSE. It reads
the parameters by their official names from the model's state_dict, and recomputes the positional table.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from fod_kernels.models import AnomalyTransformer, anomaly_energy, anomaly_transformer_loss
from helpers import max_err, tolerance

K = 3.0
T = 50.0


# ----------------------------------------------------------------------------- the official semantics

def official_pe(L, d_model):
    pos = torch.arange(0, 5000).float().unsqueeze(1)
    div = (torch.arange(0, d_model, 2).float() * -(math.log(10000.0) / d_model)).exp()
    pe = torch.zeros(5000, d_model)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe[:L]


def official_forward(p, x, H, activation="gelu"):
    """(reconstruction, [series], [prior]) from parameters p (official names) and x (B, L, C)."""
    B, L, _ = x.shape
    w = p["embedding.value_embedding.tokenConv.weight"]
    xc = torch.cat([x[:, -1:], x, x[:, :1]], dim=1).transpose(1, 2)  # circular padding by one step
    h = F.conv1d(xc, w).transpose(1, 2) + official_pe(L, w.shape[0]).to(x.dtype)
    dist = (torch.arange(L)[:, None] - torch.arange(L)[None, :]).abs().to(x.dtype)
    series_list, prior_list = [], []
    n_layers = len({n.split(".")[2] for n in p if n.startswith("encoder.attn_layers.")})
    for i in range(n_layers):
        a = lambda n: p[f"encoder.attn_layers.{i}.{n}"]  # noqa: E731
        lin = lambda t, n: F.linear(t, a(n + ".weight"), a(n + ".bias"))  # noqa: E731
        q = lin(h, "attention.query_projection").view(B, L, H, -1)
        k = lin(h, "attention.key_projection").view(B, L, H, -1)
        v = lin(h, "attention.value_projection").view(B, L, H, -1)
        sig = lin(h, "attention.sigma_projection").view(B, L, H).transpose(1, 2)
        scores = torch.einsum("blhe,bshe->bhls", q, k) / math.sqrt(q.shape[-1])
        sig = torch.pow(3, torch.sigmoid(sig * 5) + 1e-5) - 1
        sig = sig.unsqueeze(-1).repeat(1, 1, 1, L)
        prior = 1.0 / (math.sqrt(2 * math.pi) * sig) * torch.exp(-dist ** 2 / 2 / sig ** 2)
        series = torch.softmax(scores, dim=-1)
        new = lin(torch.einsum("bhls,bshd->blhd", series, v).reshape(B, L, -1), "attention.out_projection")
        h = F.layer_norm(h + new, h.shape[-1:], a("norm1.weight"), a("norm1.bias"))
        y = F.conv1d(h.transpose(1, 2), a("conv1.weight"), a("conv1.bias"))
        y = F.gelu(y) if activation == "gelu" else F.relu(y)
        y = F.conv1d(y, a("conv2.weight"), a("conv2.bias")).transpose(1, 2)
        h = F.layer_norm(h + y, h.shape[-1:], a("norm2.weight"), a("norm2.bias"))
        series_list.append(series)
        prior_list.append(prior)
    h = F.layer_norm(h, h.shape[-1:], p["encoder.norm.weight"], p["encoder.norm.bias"])
    return F.linear(h, p["projection.weight"], p["projection.bias"]), series_list, prior_list


def kl_rows(p, q):  # (B, H, L): the official my_kl_loss before its mean over the heads
    return torch.sum(p * (torch.log(p + 1e-4) - torch.log(q + 1e-4)), dim=-1)


def official_run(model, x, H):
    """Values and the two-backward gradients of the official training step, and the official energy."""
    params = {n: t.detach().clone().requires_grad_(not n.endswith(".pe")) for n, t in model.state_dict().items()}
    out, series, prior = official_forward(params, x, H)
    series_loss = prior_loss = 0.0
    kls, energy_disc = [], 0.0
    for s, pr in zip(series, prior):
        pn = pr / pr.sum(dim=-1, keepdim=True)
        series_loss = series_loss + kl_rows(s, pn.detach()).mean(1).mean() + kl_rows(pn.detach(), s).mean(1).mean()
        prior_loss = prior_loss + kl_rows(pn, s.detach()).mean(1).mean() + kl_rows(s.detach(), pn).mean(1).mean()
        kls.append((kl_rows(s, pn) + kl_rows(pn, s)).detach())
        energy_disc = energy_disc + (kl_rows(s, pn).mean(1) * T + kl_rows(pn, s).mean(1) * T).detach()
    series_loss, prior_loss = series_loss / len(prior), prior_loss / len(prior)
    rec = F.mse_loss(out, x)
    (rec - K * series_loss).backward(retain_graph=True)
    (rec + K * prior_loss).backward()
    mse = torch.mean((x - out.detach()) ** 2, dim=-1)
    res = {"out": out.detach(), "energy": torch.softmax(-energy_disc, dim=-1) * mse}
    res.update({f"kl{i}": t for i, t in enumerate(kls)})
    res.update({f"grad:{n}": t.grad for n, t in params.items() if t.requires_grad and t.grad is not None})
    return res


def ours_run(model, x):
    model.zero_grad(set_to_none=True)
    out, stats = model(x)
    anomaly_transformer_loss(x, out, stats, k=K).backward()
    res = {"out": out.detach(), "energy": anomaly_energy(x, out.detach(), [s._replace(kl_attn=s.kl_attn.detach())
                                                                           for s in stats], T)}
    for i, s in enumerate(stats):
        assert torch.equal(s.kl_attn, s.kl_prior)
        res[f"kl{i}"] = s.kl_attn.detach()
    res.update({f"grad:{n}": t.grad for n, t in model.named_parameters() if t.grad is not None})
    return res


def build(win, C, d_model, H, layers, dtype, backend, seed=0):
    torch.manual_seed(seed)
    m = AnomalyTransformer(win, C, C, d_model=d_model, n_heads=H, e_layers=layers, d_ff=2 * d_model,
                           backend=backend).to(dtype)
    with torch.no_grad():  # spread the widths over their whole range (the default init keeps sigma near 0.73)
        for layer in m.encoder.attn_layers:
            layer.attention.sigma_projection.weight.mul_(4.0)
    x = torch.randn(2, win, C, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    return m, x


PRIMES = st.sampled_from([2, 3, 5, 7, 11, 13, 17, 23, 31])
WINDOWS = st.one_of(st.just(1), st.integers(1, 20).map(lambda n: 2 * n + 1), PRIMES)


# ----------------------------------------------------------------------------- float64: equal to the official

@settings(max_examples=20)
@given(win=WINDOWS, H=st.integers(1, 3), layers=st.integers(1, 3), B=st.integers(1, 3), d_head=st.sampled_from([2, 4]),
       C=st.integers(1, 3), backend=st.sampled_from(["cpu", "reference"]))
def test_float64_equals_official_semantics(win, H, layers, B, d_head, C, backend):
    m, x = build(win, C, H * d_head, H, layers, torch.float64, backend, seed=win + 7 * H)
    x = x[:1].repeat(B, 1, 1) + 0.1 * torch.randn(B, win, C, dtype=torch.float64)
    ref, got = official_run(m, x, H), ours_run(m, x)
    assert set(got) == set(ref), set(got) ^ set(ref)  # the same parameters get gradients (not attention.norm)
    for n in ref:
        bound = tolerance(0.0, ref[n].abs().max().item(), torch.float64)
        assert max_err(got[n], ref[n]) <= bound, (n, max_err(got[n], ref[n]), bound)


def test_minimax_gradients_route_as_the_detaches():
    """The sigma projection learns only from +k * prior_loss, q/k only from -k * series_loss and rec: with
    rec removed (k = 1, reconstruction target = out itself) their gradients are the KL's, of opposite signs."""
    m, x = build(9, 2, 8, 2, 1, torch.float64, "cpu")
    out, stats = m(x)
    loss = anomaly_transformer_loss(out.detach(), out, stats, k=1.0)
    loss.backward()
    att = m.encoder.attn_layers[0].attention
    g_sigma = att.sigma_projection.weight.grad.clone()
    g_q = att.query_projection.weight.grad.clone()
    m.zero_grad()
    _, stats2 = m(x)
    (stats2[0].kl_attn + stats2[0].kl_prior - stats2[0].kl_attn.detach()).mean().backward()  # K, full gradient
    assert torch.allclose(g_sigma, att.sigma_projection.weight.grad, rtol=1e-10, atol=1e-14)
    assert torch.allclose(g_q, -att.query_projection.weight.grad, rtol=1e-10, atol=1e-14)
    assert g_sigma.abs().max() > 0 and g_q.abs().max() > 0


# ----------------------------------------------------------------------------- float32 kernels: FlashAttention rule

def _fa_rule(win, H, layers, backend):
    m, x = build(win, 3, 4 * H, H, layers, torch.float64, "reference", seed=win)
    ref64 = official_run(m, x, H)
    m32 = m.float()
    ref32 = official_run(m32, x.float(), H)
    m32.set_backend(backend)
    got = ours_run(m32, x.float())
    for n in ref64:
        bound = tolerance(max_err(ref32[n].double(), ref64[n]), ref64[n].abs().max().item(), torch.float32)
        assert max_err(got[n].double(), ref64[n]) <= bound, (backend, n, max_err(got[n].double(), ref64[n]), bound)


@settings(max_examples=8)
@given(win=WINDOWS, H=st.integers(1, 4), layers=st.integers(1, 3))
def test_float32_cpu_backend_within_the_fa_rule(win, H, layers):
    _fa_rule(win, H, layers, "cpu")


@pytest.mark.parametrize("win", [1, 13])
def test_float32_triton_backend_within_the_fa_rule(win):
    from fod_kernels import available_backends
    ok, why = available_backends()["triton"]
    if not ok:
        pytest.skip(f"triton: {why}")
    _fa_rule(win, 2, 2, "triton")


# ----------------------------------------------------------------------------- state_dict, windows, memory

OFFICIAL_LAYER_KEYS = [
    "attention.norm.weight", "attention.norm.bias",
    "attention.query_projection.weight", "attention.query_projection.bias",
    "attention.key_projection.weight", "attention.key_projection.bias",
    "attention.value_projection.weight", "attention.value_projection.bias",
    "attention.sigma_projection.weight", "attention.sigma_projection.bias",
    "attention.out_projection.weight", "attention.out_projection.bias",
    "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"]


def official_state_dict(win, C, d_model, H, layers, d_ff):
    """Random tensors under the official key names and shapes (model/AnomalyTransformer.py, attn.py, embed.py)."""
    shapes = {"embedding.value_embedding.tokenConv.weight": (d_model, C, 3),
              "embedding.position_embedding.pe": (1, 5000, d_model),
              "encoder.norm.weight": (d_model,), "encoder.norm.bias": (d_model,),
              "projection.weight": (C, d_model), "projection.bias": (C,)}
    layer = {"norm": (d_model,), "query_projection": (d_model, d_model), "key_projection": (d_model, d_model),
             "value_projection": (d_model, d_model), "sigma_projection": (H, d_model),
             "out_projection": (d_model, d_model), "conv1": (d_ff, d_model, 1), "conv2": (d_model, d_ff, 1),
             "norm1": (d_model,), "norm2": (d_model,)}
    for i in range(layers):
        for key in OFFICIAL_LAYER_KEYS:
            mod, kind = key.rsplit(".", 1)
            w = layer[mod.split(".")[-1]]
            shapes[f"encoder.attn_layers.{i}.{key}"] = w if kind == "weight" else (w[0],)
    g = torch.Generator().manual_seed(0)
    sd = {n: torch.randn(s, generator=g) * 0.3 for n, s in shapes.items()}
    sd["embedding.position_embedding.pe"] = official_pe(5000, d_model).unsqueeze(0)
    return sd


def test_state_dict_round_trip_with_official_names():
    sd = official_state_dict(win=20, C=3, d_model=8, H=2, layers=2, d_ff=6)
    m = AnomalyTransformer(20, 3, 3, d_model=8, n_heads=2, e_layers=2, d_ff=6)
    assert sorted(m.state_dict()) == sorted(sd)
    m.load_state_dict(sd, strict=True)
    assert all(torch.equal(m.state_dict()[n], sd[n]) for n in sd)
    m2 = AnomalyTransformer(20, 3, 3, d_model=8, n_heads=2, e_layers=2, d_ff=6)
    m2.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(2, 20, 3)
    assert torch.equal(m(x)[0], m2(x)[0])


def test_positional_table_grows_with_the_window_and_equals_the_official_one():
    small = AnomalyTransformer(100, 2, 2, d_model=6, n_heads=2, e_layers=1, d_ff=4)
    big = AnomalyTransformer(6001, 2, 2, d_model=6, n_heads=2, e_layers=1, d_ff=4)
    pe_s, pe_b = small.embedding.position_embedding.pe, big.embedding.position_embedding.pe
    assert pe_s.shape == (1, 5000, 6) and pe_b.shape == (1, 6001, 6)
    assert torch.equal(pe_s[0], official_pe(5000, 6)) and torch.equal(pe_b[:, :5000], pe_s)
    with pytest.raises(ValueError, match="longer than the positional table"):
        small(torch.randn(1, 5001, 2))


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_window_by_window_tensor_in_a_training_step():
    """Every tensor of a forward + loss + backward (outside the fused kernels' blocked buffers) is O(L)."""
    L = 512
    m = AnomalyTransformer(L, 2, 2, d_model=8, n_heads=2, e_layers=2, d_ff=8, backend="cpu")
    x = torch.randn(1, L, 2)
    with _LargestTensor() as probe:
        out, stats = m(x)
        anomaly_transformer_loss(x, out, stats).backward()
    assert probe.largest < L * L // 8, probe.largest  # the largest is (B, L, d_ff) or the positional table
    m.set_backend("reference")  # the materialising backend is caught by the same probe
    with _LargestTensor() as probe:
        m(x)
    assert probe.largest >= L * L


@pytest.mark.slow  # ~25 s on 2 shared cores
def test_a_window_of_16384_trains():
    L = 16384
    m = AnomalyTransformer(L, 1, 1, d_model=4, n_heads=1, e_layers=1, d_ff=4, backend="cpu")
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x = torch.sin(torch.arange(L, dtype=torch.float32) / 20).view(1, L, 1)
    out, stats = m(x)
    anomaly_transformer_loss(x, out, stats).backward()
    before = m.projection.weight.detach().clone()
    opt.step()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
    assert not torch.equal(before, m.projection.weight) and torch.isfinite(m.energy(x).detach()).all()


@pytest.mark.parametrize("kwargs, match", [(dict(activation="tanh"), "activation"), (dict(n_heads=3), "divisible"),
                                           (dict(win_size=0), "win_size"), (dict(dropout=1.0), "dropout")])
def test_bad_arguments_raise(kwargs, match):
    args = dict(win_size=10, enc_in=2, c_out=2, d_model=8, n_heads=2)
    with pytest.raises(ValueError, match=match):
        AnomalyTransformer(**{**args, **kwargs})
