"""The FOD model: single-backward minimax == the paper's two-backward procedure; embeddings; scores."""
import math

import pytest
import torch

from fod.model import LevelModel, fod_loss, sincos_2d, token_scores
from fod_kernels import sigma_from_logits

EPS = 1e-4


def _kl(p, q):  # the paper's my_kl_loss per row: sum p (log(p+eps) - log(q+eps))
    return (p * (torch.log(p + EPS) - torch.log(q + EPS))).sum(-1)


def paper_forward(model: LevelModel, feat, memory):
    """The model written out from the spec with materialised P and T (the public code's way)."""
    rows, cols = model.grid
    B, L, _ = feat.shape
    idx = torch.arange(L, dtype=feat.dtype)
    r, c = torch.div(idx, cols, rounding_mode="floor"), idx % cols
    dy2, dx2 = (r[:, None] - r[None]) ** 2, (c[:, None] - c[None]) ** 2
    x = model.embed(feat)
    ref = model.embed_ref(memory[None])
    per_layer = []
    for layer in model.layers:
        a = layer.attn
        H, Dh = a.n_heads, a.d_head

        def heads(t):
            return t.view(t.shape[0], L, H, Dh).transpose(1, 2)

        def branch(ql, kl, vl, sl, src):
            q, k, v = heads(ql(x)), heads(kl(src)), heads(vl(src))
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(Dh), dim=-1)
            sig = sigma_from_logits(sl(x)).view(B, L, H, 2).transpose(1, 2)
            sy, sx = sig[..., 0:1], sig[..., 1:2]
            prior = 1.0 / (2 * math.pi * sy * sx) * torch.exp(-dy2 / (2 * sy ** 2) - dx2 / (2 * sx ** 2))
            prior = prior / prior.sum(-1, keepdim=True)
            return (p @ v).transpose(1, 2).reshape(B, L, H * Dh), p, prior

        oi, pi, ti = branch(a.intra_q, a.intra_k, a.intra_v, a.intra_sigma, x)
        oe, pe, te = branch(a.inter_q, a.inter_k, a.inter_v, a.inter_sigma, ref)
        if a.use_out_proj:
            oi, oe = a.intra_out(oi), a.inter_out(oe)
        new_x = (x + oi) - (x + oe)
        y = x = layer.norm1(new_x)
        x = layer.norm2(x + layer.mlp(y))
        per_layer.append((pi, ti, pe, te))
    return model.head(model.norm(x)), per_layer


def two_backward_grads(model, feat, memory, l1=0.5, l2=0.5):
    out, per_layer = paper_forward(model, feat, memory)
    rec = torch.mean((out - feat) ** 2) + torch.mean(1 - torch.cosine_similarity(out, feat, dim=-1))
    n = len(per_layer)
    series_i = prior_i = series_e = prior_e = ent_i = ent_e = 0.0
    for pi, ti, pe, te in per_layer:
        series_i = series_i + (_kl(pi, ti.detach()).mean() + _kl(ti.detach(), pi).mean()) / n
        prior_i = prior_i + (_kl(ti, pi.detach()).mean() + _kl(pi.detach(), ti).mean()) / n
        series_e = series_e + (_kl(pe, te.detach()).mean() + _kl(te.detach(), pe).mean()) / n
        prior_e = prior_e + (_kl(te, pe.detach()).mean() + _kl(pe.detach(), te).mean()) / n
        ent_i = ent_i + (-(pi * torch.log(pi + EPS)).sum(-1)).mean() / n
        ent_e = ent_e + (-(pe * torch.log(pe + EPS)).sum(-1)).mean() / n
    loss1 = rec + l1 * prior_i - l1 * prior_e                              # attention detached: sigma moves
    loss2 = rec - l1 * series_i - l2 * ent_i + l1 * series_e + l2 * ent_e  # prior detached: q, k move
    model.zero_grad()
    loss1.backward(retain_graph=True)
    loss2.backward()  # accumulates: the official update uses the sum of both gradients
    return (loss1 + loss2).detach(), out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("out_proj", [True, False])
def test_single_backward_equals_two_backward(out_proj):
    torch.manual_seed(0)
    model = LevelModel(12, (4, 5), d_model=16, n_heads=2, n_layers=2, backend="reference",
                       out_proj=out_proj).double()
    with torch.no_grad():  # move sigma into a range where both KLs have real gradients
        for layer in model.layers:
            layer.attn.intra_sigma.weight.mul_(3)
            layer.attn.inter_sigma.weight.mul_(3)
    feat = torch.randn(3, 20, 12, dtype=torch.float64)
    memory = torch.randn(20, 12, dtype=torch.float64)

    want_loss, want_out, want = two_backward_grads(model, feat, memory)

    model.zero_grad()
    out, intra, inter = model(feat, memory)
    loss, _ = fod_loss(out, feat, intra, inter)
    loss.backward()
    torch.testing.assert_close(out.detach(), want_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-10, atol=1e-12)
    names = [n for n, p in model.named_parameters()]
    assert any("sigma" in n for n in names) and any("intra_q" in n for n in names)
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, want[n], rtol=1e-8, atol=1e-11, msg=lambda m: f"{n}: {m}")
    # sigma really moves in both procedures (the test would be vacuous otherwise)
    assert want["layers.0.attn.intra_sigma.weight"].abs().max() > 1e-6


def test_wrong_routes_would_be_detected():
    """Swapping the routes (kl_prior for kl_attn) changes the gradients: the equivalence test can fail."""
    torch.manual_seed(0)
    model = LevelModel(12, (4, 5), d_model=16, n_heads=2, n_layers=1, backend="reference").double()
    feat = torch.randn(2, 20, 12, dtype=torch.float64)
    memory = torch.randn(20, 12, dtype=torch.float64)
    _, _, want = two_backward_grads(model, feat, memory)
    model.zero_grad()
    out, intra, inter = model(feat, memory)
    swapped = [type(s)(s.kl_prior, s.kl_attn, s.entropy) for s in intra]
    fod_loss(out, feat, swapped, inter)[0].backward()
    assert not torch.allclose(model.layers[0].attn.intra_sigma.weight.grad,
                              want["layers.0.attn.intra_sigma.weight"], rtol=1e-6, atol=1e-9)


def test_memory_is_shared_not_tiled_and_short_batches_work():
    torch.manual_seed(0)
    model = LevelModel(8, (3, 4), d_model=8, n_heads=2, n_layers=1, backend="reference")
    memory = torch.randn(12, 8)
    for B in (1, 3, 5):
        out, intra, inter = model(torch.randn(B, 12, 8), memory)
        assert out.shape == (B, 12, 8)
        assert inter[0].kl_attn.shape == (B, 2, 12)
    # memory rows are embedded once: per-image results do not depend on the batch composition
    x = torch.randn(4, 12, 8)
    full, _, _ = model(x, memory)
    part, _, _ = model(x[1:2], memory)
    torch.testing.assert_close(full[1:2], part, rtol=1e-5, atol=1e-6)


def test_sincos_2d_halves_encode_column_then_row():
    pe = sincos_2d(8, 3, 4)
    assert pe.shape == (12, 8)
    # tokens in the same column share the first half; tokens in the same row share the second half
    torch.testing.assert_close(pe[1, :4], pe[5, :4])
    torch.testing.assert_close(pe[4, 4:], pe[7, 4:])
    assert not torch.allclose(pe[1, 4:], pe[5, 4:])
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d(6, 2, 2)


def test_token_scores_formula():
    torch.manual_seed(0)
    model = LevelModel(8, (3, 4), d_model=8, n_heads=2, n_layers=2, backend="reference")
    x = torch.randn(2, 12, 8)
    out, _, inter = model(x, torch.randn(12, 8))
    s = token_scores(out, x, inter)
    rec = ((out - x) ** 2).mean(-1) + 1 - torch.nn.functional.cosine_similarity(out, x, dim=-1)
    k = (inter[0].kl_attn + inter[1].kl_attn).mean(1) / 2
    att = torch.softmax(-k, dim=-1)
    torch.testing.assert_close(s, rec * (att.max(-1, keepdim=True).values - att))
    assert (s >= 0).all()


def test_kernel_backend_matches_reference_in_the_full_model():
    """The fused CPU kernels drive the same training step as the reference (float64, all parameters)."""
    import fod_kernels
    ok, why = fod_kernels.available_backends()["cpu"]
    if not ok:
        pytest.skip(f"cpu kernel backend unavailable: {why}")
    torch.manual_seed(0)
    model = LevelModel(12, (4, 5), d_model=16, n_heads=2, n_layers=2, backend="reference").double()
    feat = torch.randn(3, 20, 12, dtype=torch.float64)
    memory = torch.randn(20, 12, dtype=torch.float64)
    grads = {}
    for backend in ("reference", "cpu"):
        model.set_backend(backend)
        model.zero_grad()
        out, intra, inter = model(feat, memory)
        loss, _ = fod_loss(out, feat, intra, inter)
        loss.backward()
        grads[backend] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["cpu"][0], grads["reference"][0], rtol=1e-9, atol=1e-11)
    for n, g in grads["reference"][1].items():
        torch.testing.assert_close(grads["cpu"][1][n], g, rtol=1e-7, atol=1e-10, msg=lambda m: f"{n}: {m}")
