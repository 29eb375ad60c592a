"""Pins of every constant and convention of the FOD recipe (spec section 5), each against an independent
computation (numpy, math, literal numbers) rather than against the code itself.

Each test names the plausible mutation it kills (checked by hand, see docs/MUTATION.md); a test that compared
the pipeline with itself, or with a tolerance wider than the change, would let these publish different numbers.
Known bugs are xfail(strict=True) with the reason: they flip (and fail) when fixed.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

# Everything the pins need from the package, in one place (the pipeline modules are being split: repoint here).
import fod_kernels.module as fk_module
from fod import cli
from fod.backbone import Backbone
from fod.data import AnomalyDataset, denormalize, load_image, load_mask
from fod.metrics import evaluate_maps, image_scores
from fod.model import LevelModel, default_d_model, fod_loss, token_scores
from fod.config import Config
from fod.model import FOD, reference_memory
from fod_kernels import CorrelationStats, I2Correlation, sigma_from_logits

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # literal, not the module's constants
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------ helpers
def _sigmoid(z: float) -> float:
    if z == -math.inf:
        return 0.0
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _sigma_exact(z: float) -> float:
    return 3.0 ** (_sigmoid(5.0 * z) + 1e-5) - 1.0


def _bilinear_align_corners(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Explicit bilinear interpolation with align_corners=True: output pixel i samples source i*(n-1)/(N-1)."""

    def axis(n_in, n_out):
        src = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = axis(a.shape[-2], out_h)
    x0, x1, wx = axis(a.shape[-1], out_w)
    rows = a[..., y0, :] * (1 - wy)[:, None] + a[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


def _gaussian_filter_explicit(m: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian, radius int(4 sigma + 0.5) (scipy's truncate=4), half-sample symmetric borders."""
    r = int(4.0 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    H, W = m.shape
    p = np.pad(m.astype(np.float64), r, mode="symmetric")
    rows = sum(k[i] * p[i:i + H, :] for i in range(2 * r + 1))
    return sum(k[j] * rows[:, j:j + W] for j in range(2 * r + 1))


class FakeBackbone(nn.Module):
    """Stands in for fod.backbone.Backbone: fixed random 1x1 projections of the image pooled to each grid."""

    def __init__(self, channels, grids, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.channels, self.grids = list(channels), [tuple(x) for x in grids]
        self.proj = [torch.randn(c, 3, generator=g) for c in self.channels]

    def forward(self, images):
        return [torch.einsum("ck,bkhw->bchw", w, F.adaptive_avg_pool2d(images, grid))
                for w, grid in zip(self.proj, self.grids)]


def _small_fod(grids, channels=(6, 5), seed=0):
    torch.manual_seed(seed)
    cfg = Config(n_heads=2, n_layers=2, d_model=[8] * len(grids), backend="reference", batch_size=2)
    bb = FakeBackbone(channels[:len(grids)], grids, seed)
    mems = [torch.randn(g[0] * g[1], c) for g, c in zip(grids, channels)]
    return FOD(cfg, bb, grids, mems), cfg


def _write(path, arr):
    Image.fromarray(arr).save(path)
    return path


def _stats(B, H, L, g, lo=0.0, hi=3.0):
    k = lo + (hi - lo) * torch.rand(B, H, L, generator=g, dtype=torch.float64)
    return CorrelationStats(k, k.clone(), torch.rand(B, H, L, generator=g, dtype=torch.float64) * 7)


# ------------------------------------------------------------------------------------------ sigma
@pytest.mark.parametrize("z", [-math.inf, -30.0, -2.0, -0.3, 0.0, 0.07, 0.2, 1.0, 4.0, 30.0, math.inf])
def test_sigma_parametrisation_values(z):
    """sigma = 3 ** (sigmoid(5 z) + 1e-5) - 1. Kills sigmoid(5z) -> sigmoid(z), base 3 -> 2, 1e-5 -> 0, -1 dropped."""
    got = sigma_from_logits(torch.tensor([z], dtype=torch.float64)).item()
    assert got == pytest.approx(_sigma_exact(z), rel=1e-13, abs=0)


def test_sigma_limits():
    z = torch.tensor([-math.inf, -1e4, 1e4, math.inf], dtype=torch.float64)
    lo, lo2, hi2, hi = sigma_from_logits(z).tolist()
    assert lo == lo2 == pytest.approx(3 ** 1e-5 - 1, rel=1e-13)            # 1.0986183e-05: sigma > 0 always
    assert hi == hi2 == pytest.approx(3 ** (1 + 1e-5) - 1, rel=1e-13)      # 2.0000329586
    assert lo == pytest.approx(1.0986183e-05, rel=1e-7) and hi == pytest.approx(2.0000329586, rel=1e-10)
    # float32 (the training dtype) agrees up to the rounding of 3 ** s near 1 (as the reference implementation:
    # 3 ** s - 1 cancels, so near the lower limit 1.1e-5 the relative error reaches ~5e-3; the prior is one-hot there)
    z32 = torch.tensor([-3.0, -0.1, 0.0, 0.15, 2.0])
    want = torch.tensor([_sigma_exact(float(v)) for v in z32], dtype=torch.float64)
    torch.testing.assert_close(sigma_from_logits(z32).double(), want, rtol=0, atol=2.4e-7)


def test_the_layer_feeds_two_sigmas_per_head_in_that_parametrisation(monkeypatch):
    """I2Correlation passes sigma[b, h, l, a] = sigma(linear(x)[b, l, 2h + a]) to the operator, per branch."""
    torch.manual_seed(0)
    layer = I2Correlation(8, 2, (2, 3), backend="reference").double()
    x, ref = torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(1, 6, 8, dtype=torch.float64)
    seen = {}
    real = fk_module.i2correlation

    def spy(*args, **kwargs):
        seen["intra"], seen["inter"] = args[3], args[7]
        return real(*args, **kwargs)

    monkeypatch.setattr(fk_module, "i2correlation", spy)
    with torch.no_grad():
        layer(x, ref)
        for name, lin in (("intra", layer.intra_sigma), ("inter", layer.inter_sigma)):
            logits = lin(x).numpy()  # (B, L, 2H)
            want = np.vectorize(_sigma_exact)(logits).reshape(2, 6, 2, 2).transpose(0, 2, 1, 3)
            np.testing.assert_allclose(seen[name].numpy(), want, rtol=1e-13, err_msg=name)


# ------------------------------------------------------------------------------------------ scores
def test_token_score_formula_exact():
    """rec_score * inter_score with rec = mean_c (out-x)^2 + 1 - cos, inter = softmax over tokens of
    -mean_{layers,heads} K_inter, inter_score = max - value. Independent numpy computation."""
    g = torch.Generator().manual_seed(0)
    B, L, C, H, n_layers = 2, 7, 5, 3, 2
    out = torch.randn(B, L, C, generator=g, dtype=torch.float64)
    x = torch.randn(B, L, C, generator=g, dtype=torch.float64)
    inter = [_stats(B, H, L, g) for _ in range(n_layers)]
    got = token_scores(out, x, inter).numpy()

    o, xx = out.numpy(), x.numpy()
    cos = (o * xx).sum(-1) / (np.linalg.norm(o, axis=-1) * np.linalg.norm(xx, axis=-1))
    rec = ((o - xx) ** 2).mean(-1) + 1 - cos
    k = np.mean([s.kl_attn.numpy() for s in inter], axis=0).mean(1)  # (B, L)
    att = np.exp(-k) / np.exp(-k).sum(-1, keepdims=True)
    want = rec * (att.max(-1, keepdims=True) - att)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    # the token closest to the normal reference (smallest K_inter) scores exactly 0
    assert (got[np.arange(B), k.argmin(-1)] == 0).all()


def test_image_score_is_the_max_of_a_sigma_4_gaussian_filter():
    """Default sigma 4, in image_scores and in evaluate_maps (the training/test path). Kills sigma 4 -> 2,
    max -> mean."""
    rng = np.random.default_rng(0)
    maps = rng.random((4, 48, 40)) ** 4
    maps[1, 20, 13] = 40.0
    maps[2, 0, 0] = 25.0  # a corner spike: the border convention matters
    want = np.array([_gaussian_filter_explicit(m, 4.0).max() for m in maps])
    np.testing.assert_allclose(image_scores(maps), want, rtol=1e-12)
    masks = np.zeros(maps.shape, bool)
    masks[2:, 10:20, 10:20] = True
    res = evaluate_maps(maps, masks, [0, 0, 1, 1], ["good", "good", "a", "a"])
    np.testing.assert_allclose(res["image_scores"], want, rtol=1e-12)
    # the pin is sharp: sigma 2 gives different scores
    assert not np.allclose([_gaussian_filter_explicit(m, 2.0).max() for m in maps], want, rtol=1e-3)


def test_anomaly_map_corners_are_the_corner_tokens_scores():
    """align_corners=True: the map's corner pixels are exactly the corner tokens' scores (one level)."""
    grid = (3, 5)
    fod, _ = _small_fod([grid])
    images = torch.randn(2, 3, 16, 16)
    maps = fod.anomaly_maps(images)
    feat = fod.tokens(images)[0]
    with torch.no_grad():
        out, _, inter = fod.models[0](feat, fod.memories[0])
    s = token_scores(out, feat, inter)  # (B, L), row-major tokens
    R, Cc = grid
    for (py, px), tok in {(0, 0): 0, (0, -1): Cc - 1, (-1, 0): (R - 1) * Cc, (-1, -1): R * Cc - 1}.items():
        torch.testing.assert_close(maps[:, py, px], s[:, tok], rtol=1e-6, atol=0)


def test_anomaly_map_is_the_bilinear_align_corners_upsampling_averaged_over_levels():
    """Against an explicit numpy interpolation. Kills align_corners True -> False, bilinear -> nearest/bicubic,
    a transposed grid, and a sum instead of the mean over levels."""
    grids = [(3, 5), (2, 4)]
    fod, _ = _small_fod(grids)
    images = torch.randn(2, 3, 17, 17)
    maps = fod.anomaly_maps(images).numpy()
    want = []
    for feat, model, mem, g in zip(fod.tokens(images), fod.models, fod.memories, grids):
        with torch.no_grad():
            out, _, inter = model(feat, mem)
        s = token_scores(out, feat, inter).double().numpy().reshape(-1, *g)
        want.append(_bilinear_align_corners(s, 17, 17))
    want = np.mean(want, axis=0)
    assert maps.shape == (2, 17, 17)
    np.testing.assert_allclose(maps, want, rtol=1e-5, atol=1e-7 * np.abs(want).max())


# ------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("lambdas", [None, (0.3, 0.7)])
def test_loss_weights(lambdas):
    """2 rec + l1 K_intra|prior - l1 K_inter|prior - l1 K_intra|attn - l2 E_intra + l1 K_inter|attn + l2 E_inter,
    each statistic averaged over layers, heads, batch and tokens; defaults l1 = l2 = 0.5. Each weight is pinned
    by its own gradient."""
    l1, l2 = lambdas or (0.5, 0.5)
    g = torch.Generator().manual_seed(0)
    B, H, L, C, n_layers = 2, 3, 6, 4, 2

    def leaves():
        return [CorrelationStats(*(torch.rand(B, H, L, generator=g, dtype=torch.float64).requires_grad_()
                                   for _ in range(3))) for _ in range(n_layers)]

    intra, inter = leaves(), leaves()
    out = torch.randn(B, L, C, generator=g, dtype=torch.float64).requires_grad_()
    x = torch.randn(B, L, C, generator=g, dtype=torch.float64)
    loss, _ = fod_loss(out, x, intra, inter) if lambdas is None else fod_loss(out, x, intra, inter, *lambdas)
    loss.backward()

    o, xx = out.detach().numpy(), x.numpy()
    cos = (o * xx).sum(-1) / (np.linalg.norm(o, axis=-1) * np.linalg.norm(xx, axis=-1))
    rec = ((o - xx) ** 2).mean() + (1 - cos).mean()
    mean = lambda st, f: np.mean([getattr(s, f).detach().numpy() for s in st])  # noqa: E731
    want = (2 * rec + l1 * mean(intra, "kl_prior") - l1 * mean(inter, "kl_prior") - l1 * mean(intra, "kl_attn")
            - l2 * mean(intra, "entropy") + l1 * mean(inter, "kl_attn") + l2 * mean(inter, "entropy"))
    assert loss.item() == pytest.approx(want, rel=1e-13)

    weights = {("intra", "kl_prior"): l1, ("inter", "kl_prior"): -l1, ("intra", "kl_attn"): -l1,
               ("intra", "entropy"): -l2, ("inter", "kl_attn"): l1, ("inter", "entropy"): l2}
    n = n_layers * B * H * L
    for (branch, field), w in weights.items():
        for s in (intra if branch == "intra" else inter):
            grad = getattr(s, field).grad
            torch.testing.assert_close(grad, torch.full_like(grad, w / n), rtol=1e-13, atol=0,
                                       msg=lambda m: f"{branch} {field}: {m}")
    # rec counts twice: d loss / d out = 2 d rec / d out
    o2 = out.detach().clone().requires_grad_()
    rec_t = torch.mean((o2 - x) ** 2) + torch.mean(1 - F.cosine_similarity(o2, x, dim=-1))
    rec_t.backward()
    torch.testing.assert_close(out.grad, 2 * o2.grad, rtol=1e-13, atol=1e-16)


# ------------------------------------------------------------------------------------------ memory
def test_reference_memory_is_the_per_position_mean_of_the_training_features():
    """Per level (L, C): the mean over images, position by position; batches of 2 over 5 images (a short last
    batch), and the cached-feature path gives the same."""
    fod, cfg = _small_fod([(3, 5), (2, 4)])
    g = torch.Generator().manual_seed(1)
    imgs = [torch.randn(3, 16, 16, generator=g) for _ in range(5)]
    ds = [{"image": im} for im in imgs]
    feats = [f.detach() for f in fod.tokens(torch.stack(imgs))]  # [(5, L, C)]
    want = [np.mean(f.double().numpy(), axis=0) for f in feats]
    got = reference_memory(fod, ds, cfg, "cpu")
    got_cached = reference_memory(fod, ds, cfg, "cpu", cached=feats)
    for lv, (a, b, w) in enumerate(zip(got, got_cached, want)):
        assert tuple(a.shape) == w.shape, lv
        np.testing.assert_allclose(a.double().numpy(), w, rtol=1e-5, atol=1e-6, err_msg=f"level {lv}")
        np.testing.assert_allclose(b.double().numpy(), w, rtol=1e-5, atol=1e-6, err_msg=f"level {lv} cached")


# ------------------------------------------------------------------------------------------ images and masks
def test_normalisation_is_imagenet_mean_std_of_x_over_255(tmp_path):
    rgb = np.array([[[0, 128, 255], [10, 20, 30]], [[255, 0, 77], [200, 100, 50]]], np.uint8)
    x = load_image(_write(tmp_path / "im.png", rgb), image_size=2).numpy()
    want = (rgb.astype(np.float64) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x, want.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(denormalize(torch.from_numpy(x)), rgb / 255, atol=1e-6)


def _mask_file(tmp_path, arr, name="m.png"):
    return _write(tmp_path / name, arr)


def _pattern(dtype, on):
    m = np.zeros((12, 12), dtype)
    m[2:5, 3:9] = on
    m[8, 8] = on
    return m


def test_mask_0_255_reads_as_the_nonzero_pixels(tmp_path):
    m = _pattern(np.uint8, 255)
    got = load_mask(_mask_file(tmp_path, m), image_size=12)
    assert got.dtype == torch.bool and torch.equal(got, torch.from_numpy(m > 0))


@pytest.mark.parametrize("value", [128, 129, 200, 254, 255])
def test_mask_grey_values_are_defects(tmp_path, value):
    """Any non-zero grey is a defect; 128..255 already read so. Kills a threshold moved up (> 127 -> > 128...)."""
    m = _pattern(np.uint8, value)
    m[0, 0] = 255
    got = load_mask(_mask_file(tmp_path, m), image_size=12)
    assert torch.equal(got, torch.from_numpy(m > 0))


@pytest.mark.parametrize("value", [1, 2, 64, 126, 127])
def test_mask_low_grey_values_are_defects(tmp_path, value):
    """Low grey values are defects too: kills any threshold above 0 (> 127, > 100, ...)."""
    m = _pattern(np.uint8, value)
    got = load_mask(_mask_file(tmp_path, m), image_size=12)
    assert torch.equal(got, torch.from_numpy(m > 0))


def test_mask_0_1_equals_0_255_in_the_dataset(tmp_path):
    root = tmp_path / "cat"
    for d in ("train/good", "test/good", "test/a", "test/b", "ground_truth/a", "ground_truth/b"):
        (root / d).mkdir(parents=True)
    img = np.full((12, 12, 3), 90, np.uint8)
    for p in ("train/good/0.png", "test/good/0.png", "test/a/0.png", "test/b/0.png"):
        _write(root / p, img)
    _write(root / "ground_truth/a/0_mask.png", _pattern(np.uint8, 1))
    _write(root / "ground_truth/b/0_mask.png", _pattern(np.uint8, 255))
    ds = AnomalyDataset(root, "test", image_size=12)
    by = {it["defect"]: it["mask"] for it in (ds[i] for i in range(len(ds)))}
    assert by["b"].sum() == (_pattern(np.uint8, 1) > 0).sum()
    assert torch.equal(by["a"], by["b"])


@pytest.mark.parametrize("value", [1, 255, 256, 40000, 65535])
def test_mask_16_bit_any_nonzero_is_a_defect(tmp_path, value):
    m = _pattern(np.uint16, value)
    path = _mask_file(tmp_path, m)
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file
    got = load_mask(path, image_size=12)
    assert torch.equal(got, torch.from_numpy(m > 0))


@pytest.mark.parametrize("resize,size", [(31, 27), (13, 13), (20, 16)])
def test_mask_geometry_is_nearest_resize_then_centre_crop(tmp_path, resize, size):
    """Masks: resize to resize x resize with nearest neighbour (source pixel floor((i + 0.5) * n / resize)), then the
    centre crop. Kills a bicubic/bilinear mask resize (grey edges change the defect area) and an off-centre crop."""
    m = (np.random.default_rng(0).random((20, 20)) > 0.7).astype(np.uint8) * 255
    got = load_mask(_mask_file(tmp_path, m), image_size=size, resize=resize).numpy()
    idx = np.floor((np.arange(resize) + 0.5) * 20 / resize).astype(int)
    off = (resize - size) // 2
    want = (m[np.ix_(idx, idx)] > 0)[off:off + size, off:off + size]
    np.testing.assert_array_equal(got, want)


def test_default_sizes_are_the_recipe_256(tmp_path):
    """load_image and load_mask default to 256 x 256 (resize 256, centre-crop 256)."""
    path = _write(tmp_path / "x.png", np.full((40, 30, 3), 9, np.uint8))
    assert tuple(load_image(path).shape) == (3, 256, 256)
    assert tuple(load_mask(_mask_file(tmp_path, _pattern(np.uint8, 255))).shape) == (256, 256)


# ------------------------------------------------------------------------------------------ defaults
def test_defaults_of_the_recipe():
    cfg = Config()
    assert (cfg.lambda1, cfg.lambda2, cfg.lr, cfg.n_heads, cfg.n_layers, cfg.eps) == (0.5, 0.5, 1e-4, 8, 3, 1e-4)
    assert (cfg.backbone, cfg.image_size, cfg.d_model, cfg.levels) == ("wide_resnet50_2", 256, None, None)
    assert default_d_model(32 * 32) == 256 and default_d_model(16 * 16) == 512
    # the CLI resolves to the same recipe
    args = cli.build_parser().parse_args(["train", "--data", "d", "--output", "o"])
    c = cli.resolve_config(args)
    assert (c.lambda1, c.lambda2, c.lr, c.n_heads, c.n_layers, c.eps, c.backbone, c.image_size, c.d_model) == (
        0.5, 0.5, 1e-4, 8, 3, 1e-4, "wide_resnet50_2", 256, None)
    # LevelModel's own defaults: d_model 256, 8 heads, 3 layers, eps 1e-4
    lm = LevelModel(16, (2, 2))
    assert len(lm.layers) == 3 and lm.layers[0].attn.n_heads == 8 and lm.layers[0].attn.d_model == 256
    assert all(layer.attn.eps == 1e-4 for layer in lm.layers)


def test_default_bundle_widths_heads_layers_per_level():
    """wide_resnet50_2's levels (512 ch at 32x32, 1024 ch at 16x16) get d_model 256 and 512, 8 heads, 3 layers."""
    cfg = Config(backend="reference")
    fod = FOD(cfg, FakeBackbone([512, 1024], [(32, 32), (16, 16)]), [(32, 32), (16, 16)])
    assert fod.d_models == [256, 512]
    for m, d, c in zip(fod.models, (256, 512), (512, 1024)):
        assert len(m.layers) == 3 and m.head.out_features == c and m.embed.proj.in_features == c
        assert all(layer.attn.n_heads == 8 and layer.attn.d_model == d and layer.attn.eps == 1e-4
                   for layer in m.layers)


def test_backbone_levels_and_avgpool_3_1_1():
    """Default levels: stride 8 and 16 (layer2, layer3); each through AvgPool2d(3, 1, 1) with zero padding counted
    (count_include_pad, as the reference). Explicit 3x3 box sum / 9."""
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        bb = Backbone("resnet18", pretrained=False)
    assert bb.levels == ["layer2", "layer3"] and bb.strides == [8, 16]
    images = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = bb.net(images)
    got = bb(images)
    assert len(got) == 2
    for r, y in zip(raw, got):
        a = np.pad(r.double().numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
        H, W = r.shape[-2:]
        want = sum(a[..., i:i + H, j:j + W] for i in range(3) for j in range(3)) / 9
        np.testing.assert_allclose(y.double().numpy(), want, rtol=1e-5, atol=1e-6)
