"""Dataset layouts (MVTec AD, BTAD, MVTec 3D-AD), preprocessing, error cases, the synthetic generator,
backbone weights."""
import numpy as np
import pytest
import torch
from PIL import Image

from fod.data import IMAGENET_MEAN, IMAGENET_STD, AnomalyDataset, Preprocess, check_split, list_samples, load_image
from fod.synthetic import make_dataset


def _img(path, size=20, grey=False, value=128, ext_mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size) if grey else (size, size, 3), value, np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _mask(path, size=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size, size), np.uint8)
    m[5:10, 5:10] = 255
    Image.fromarray(m).save(path)


@pytest.fixture
def mvtec(tmp_path):
    root = tmp_path / "cat"
    _img(root / "train/good/000.png")
    _img(root / "train/good/001.png", grey=True)
    _img(root / "test/good/000.png")
    _img(root / "test/crack/000.png")
    _mask(root / "ground_truth/crack/000_mask.png")
    return root


def test_mvtec_layout_any_category(mvtec):
    train = list_samples(mvtec, "train")
    test = list_samples(mvtec, "test")
    assert [s.defect for s in train] == ["good", "good"]
    assert [(s.defect, s.mask is not None) for s in test] == [("crack", True), ("good", False)]
    ds = AnomalyDataset(mvtec, "test", image_size=16, resize=20)
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["label"] == 1 and item["mask"].dtype == torch.bool
    # the 5:10 square of the 20 px mask lands at 3:8 after the centre crop of 2 px
    assert item["mask"].sum() == 25 and item["mask"][3:8, 3:8].all()
    assert ds[1]["mask"].sum() == 0 and ds[1]["label"] == 0


def test_grey_to_three_channels_and_imagenet_normalisation(mvtec):
    x = load_image(mvtec / "train/good/001.png", image_size=8)
    assert x.shape == (3, 8, 8)
    want = (128 / 255 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(x[:, 0, 0].numpy(), want, rtol=1e-5)


def test_missing_mask_names_the_file(mvtec):
    (mvtec / "ground_truth/crack/000_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"000_mask\.png"):
        list_samples(mvtec, "test")


def test_unreadable_image_names_the_file(mvtec):
    bad = mvtec / "train/good/002.png"
    bad.write_bytes(b"not an image")
    ds = AnomalyDataset(mvtec, "train", image_size=8)
    with pytest.raises(ValueError, match=r"cannot read image .*002\.png"):
        ds[2]


def test_empty_split_and_missing_dirs(mvtec, tmp_path):
    for p in (mvtec / "train/good").iterdir():
        p.unlink()
    with pytest.raises(FileNotFoundError, match=r"empty train split.*train/good"):
        list_samples(mvtec, "train")
    with pytest.raises(FileNotFoundError, match="dataset directory not found"):
        list_samples(tmp_path / "nope", "train")
    with pytest.raises(FileNotFoundError, match="test directory not found"):
        list_samples(tmp_path, "test")
    with pytest.raises(ValueError, match="unknown dataset layout"):
        list_samples(mvtec, "train", "kolektor")


def test_btad_layout(tmp_path):
    root = tmp_path / "01"
    _img(root / "train/ok/0000.bmp")
    _img(root / "test/ok/0001.bmp")
    _img(root / "test/ko/0002.bmp")
    _mask(root / "ground_truth/ko/0002.png")
    test = list_samples(root, "test", "btad")
    assert [(s.defect, s.mask.name if s.mask else None) for s in test] == [("good", None), ("ko", "0002.png")]
    assert len(list_samples(root, "train", "btad")) == 1
    (root / "ground_truth/ko/0002.png").unlink()
    with pytest.raises(FileNotFoundError, match="0002"):
        list_samples(root, "test", "btad")


def test_mvtec3d_rgb_layout(tmp_path):
    root = tmp_path / "bagel"
    _img(root / "train/good/rgb/000.png")
    _img(root / "validation/good/rgb/000.png")
    _img(root / "test/good/rgb/000.png")
    _img(root / "test/crack/rgb/000.png")
    _mask(root / "test/crack/gt/000.png")
    test = list_samples(root, "test", "mvtec3d")
    assert [(s.defect, s.mask is not None) for s in test] == [("crack", True), ("good", False)]
    assert len(list_samples(root, "train", "mvtec3d")) == 1
    ds = AnomalyDataset(root, "test", "mvtec3d", image_size=20)
    assert ds[0]["mask"].sum() == 25


def test_synthetic_generator_is_deterministic_and_in_mvtec_layout(tmp_path):
    a = make_dataset(tmp_path / "a", size=32, n_train=3, n_test_good=2, n_test_defect=2, seed=3)
    b = make_dataset(tmp_path / "b", size=32, n_train=3, n_test_good=2, n_test_defect=2, seed=3)
    test = list_samples(a, "test")
    assert sorted({s.defect for s in test}) == ["cut", "good", "scratch", "spot"]
    for s in test:
        if s.mask is not None:
            m = np.asarray(Image.open(s.mask))
            assert m.any(), s.mask  # every defect has a non-empty mask
        rel = s.image.relative_to(a)
        assert np.array_equal(np.asarray(Image.open(s.image)), np.asarray(Image.open(b / rel)))
    with pytest.raises(FileExistsError):
        make_dataset(a, size=32, n_train=1)


def test_backbone_local_weights_and_unreachable_hub(tmp_path, monkeypatch):
    import timm

    from fod import backbone as B
    torch.manual_seed(1)
    src = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    bb = B.Backbone("resnet18", ["layer1", "layer2"], weights=str(path))
    torch.testing.assert_close(bb.net.conv1.weight, src.conv1.weight)
    assert bb.channels == [64, 128] and bb.strides == [4, 8] and "local file" in bb.weights_source
    feats = bb(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 8, 8), (2, 128, 4, 4)]
    assert all(not p.requires_grad for p in bb.parameters())

    # no cached ImageNet weights, hub unreachable: a clear error, no network traffic in this test
    monkeypatch.setattr(B, "_hub_reachable", lambda timeout=3.0: False)
    real = timm.create_model

    def no_cache(name, pretrained=False, **kw):
        if pretrained:
            raise RuntimeError("not in the local cache")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", no_cache)
    with pytest.raises(B.WeightsUnavailable, match=r"--weights FILE.*--no-pretrained"):
        B.Backbone("resnet18", ["layer1"], pretrained=True)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        B.Backbone("resnet18", ["layer1"], pretrained=False)
    with pytest.raises(ValueError, match="no feature level"):
        B.Backbone("resnet18", ["layer9"], pretrained=False)


# ----------------------------------------------------------------------------- pixel depths and modes (issue 11)

def _png48(path, arr):
    """A 48-bit RGB PNG (Pillow cannot write one), written by hand."""
    import struct
    import zlib
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _pixels01(path, size=4):
    """What the pipeline reads, back in 0..1 (before normalisation), (size, size, 3)."""
    return Preprocess(size).denormalize(load_image(path, size))


GREY16 = np.array([[0, 1000, 30000, 65535]] * 4, np.uint16)


@pytest.mark.parametrize("kind", ["I;16 png", "I;16B tif", "I tif", "F tif"])
def test_high_bit_depth_grey_is_scaled_by_its_true_range(tmp_path, kind):
    """A 16-bit camera image was read as solid white; now 0..65535 -> 0..1 (float images as given)."""
    want = GREY16 / 65535.0
    if kind == "I;16 png":
        im, path = Image.fromarray(GREY16), tmp_path / "g.png"
    elif kind == "I;16B tif":
        im, path = Image.frombytes("I;16B", (4, 4), GREY16.astype(">u2").tobytes()), tmp_path / "g.tif"
    elif kind == "I tif":
        im, path = Image.fromarray(GREY16.astype(np.int32), "I"), tmp_path / "g.tif"
    else:
        im, path = Image.fromarray(want.astype(np.float32), "F"), tmp_path / "g.tif"
    im.save(path)
    assert Image.open(path).mode == kind.split()[0]
    got = _pixels01(path)
    for c in range(3):
        np.testing.assert_allclose(got[..., c], want, atol=1e-6)


def test_eight_bit_modes_and_48_bit_rgb(tmp_path):
    rgb = np.array([[[10, 100, 250], [0, 255, 128]], [[77, 3, 200], [255, 0, 0]]], np.uint8)
    rgb = np.kron(rgb, np.ones((2, 2, 1), np.uint8))  # 4x4 so no resampling is involved
    cases = {"L": (Image.fromarray(rgb[..., 0]), np.repeat(rgb[..., :1], 3, 2)),
             "RGB": (Image.fromarray(rgb), rgb),
             "RGBA": (Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])), rgb),
             "LA": (Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]]), "LA"), np.repeat(rgb[..., :1], 3, 2)),
             "P": (Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=8), rgb),
             "1": (Image.fromarray(rgb[..., 0] > 100), np.repeat((rgb[..., :1] > 100) * 255, 3, 2))}
    for mode, (im, want) in cases.items():
        assert im.mode == mode
        im.save(tmp_path / f"{mode}.png")
        np.testing.assert_allclose(_pixels01(tmp_path / f"{mode}.png"), want / 255.0, atol=1e-6, err_msg=mode)
    deep = (np.arange(48).reshape(4, 4, 3) * 1365).astype(np.uint16)
    got = _pixels01(_png48(tmp_path / "rgb48.png", deep))
    np.testing.assert_allclose(got, deep / 65535.0, atol=1 / 255)  # Pillow reads 48-bit at 8-bit precision


def test_grey_values_out_of_range_are_errors(tmp_path):
    Image.fromarray(np.full((4, 4), 70000, np.int32), "I").save(tmp_path / "i.tif")
    with pytest.raises(ValueError, match=r"i\.tif.*0\.\.65535"):
        load_image(tmp_path / "i.tif", 4)
    Image.fromarray(np.full((4, 4), 255.0, np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=r"f\.tif.*0\.\.1"):
        load_image(tmp_path / "f.tif", 4)


# ----------------------------------------------------------------------------- masks

def _mask_values(path, value, size=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size, size), np.uint16 if value > 255 else np.uint8)
    m[5:10, 5:10] = value
    Image.fromarray(m).save(path)


@pytest.mark.parametrize("value", [1, 255, 65535])
def test_any_nonzero_mask_value_is_a_defect(mvtec, value):
    """A 0/1 mask was read as empty; 0/1, 0/255 and 16-bit masks are now the same mask."""
    _mask_values(mvtec / "ground_truth/crack/000_mask.png", value)
    ds = AnomalyDataset(mvtec, "test", image_size=16, resize=20)
    item = ds[0]
    assert item["mask"].sum() == 25 and item["mask"][3:8, 3:8].all()


def test_colour_and_palette_masks(mvtec):
    m = np.zeros((20, 20, 3), np.uint8)
    m[5:10, 5:10, 2] = 1  # a dark blue defect: non-zero in one channel only
    Image.fromarray(m).save(mvtec / "ground_truth/crack/000_mask.png")
    assert AnomalyDataset(mvtec, "test", image_size=20)[0]["mask"].sum() == 25
    Image.fromarray(m).convert("P", palette=Image.ADAPTIVE, colors=2).save(mvtec / "ground_truth/crack/000_mask.png")
    assert AnomalyDataset(mvtec, "test", image_size=20)[0]["mask"].sum() == 25


def test_mask_of_another_size_is_an_error_naming_it(mvtec):
    _mask(mvtec / "ground_truth/crack/000_mask.png", size=24)
    ds = AnomalyDataset(mvtec, "test", image_size=16)
    with pytest.raises(ValueError, match=r"000_mask\.png is 24x24 pixels but its image is 20x20"):
        ds[0]


def test_jpeg_mask_is_refused(mvtec):
    (mvtec / "ground_truth/crack/000_mask.png").unlink()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(mvtec / "ground_truth/crack/000_mask.jpg")
    with pytest.raises(ValueError, match=r"000_mask\.jpg is a JPEG"):
        AnomalyDataset(mvtec, "test", image_size=16)[0]


def test_check_split_reads_everything_and_needs_both_classes(mvtec):
    check_split(AnomalyDataset(mvtec, "test", image_size=16))
    (mvtec / "test/good/000.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"cannot read image .*test/good/000\.png"):
        check_split(AnomalyDataset(mvtec, "test", image_size=16))
    (mvtec / "test/good/000.png").unlink()
    (mvtec / "test/good").rmdir()
    with pytest.raises(ValueError, match="only defective images"):
        check_split(AnomalyDataset(mvtec, "test", image_size=16))


# ----------------------------------------------------------------------------- geometry and interpolation

def _bands(w, h):
    """Red outer quarters and green centre half along the longer side."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = 255
    if w >= h:
        arr[:, w // 4: 3 * w // 4] = (0, 255, 0)
    else:
        arr[h // 4: 3 * h // 4, :] = (0, 255, 0)
    return arr


@pytest.mark.parametrize("w,h", [(80, 40), (40, 80)])
def test_non_square_images_keep_their_aspect_ratio_then_centre_crop(tmp_path, w, h):
    """Squashing an 80x40 image to a square kept the red ends in view; resize-shorter-side + centre crop
    shows only the green centre half."""
    Image.fromarray(_bands(w, h)).save(tmp_path / "a.png")
    m = np.zeros((h, w), np.uint8)
    m[h // 2 - 2: h // 2 + 2, w // 2 - 2: w // 2 + 2] = 255  # a 4x4 square in the centre
    Image.fromarray(m).save(tmp_path / "m.png")
    for interp in ("lanczos", "bilinear", "bicubic"):
        pre = Preprocess(16, None, interp)
        img, mask = pre.image_and_mask(tmp_path / "a.png", tmp_path / "m.png")
        px = pre.denormalize(img)
        assert px.shape == (16, 16, 3)
        np.testing.assert_allclose(px[2:-2, 2:-2], np.broadcast_to([0, 1, 0], (12, 12, 3)), atol=0.02)
        # the 4x4 centre square of the mask, scaled by 16/40, stays centred: rows and columns 6..9
        assert mask.sum() == 4 and mask[7:9, 7:9].all(), (interp, np.argwhere(mask.numpy()))


def test_interpolation_filters(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (37, 37, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "r.png")
    for name, f in (("lanczos", Image.LANCZOS), ("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
        want = np.asarray(Image.fromarray(arr).resize((16, 16), f), np.float32) / 255
        got = Preprocess(16, None, name).denormalize(load_image(tmp_path / "r.png", 16, interpolation=name))
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=name)
    a = load_image(tmp_path / "r.png", 16, interpolation="lanczos")
    b = load_image(tmp_path / "r.png", 16, interpolation="bilinear")
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown interpolation"):
        Preprocess(16, None, "nearest")


def test_normalisation_follows_the_backbone(tmp_path):
    """The mean/std come from timm's pretrained configuration: ImageNet's for ResNets, 0.5 for BiT."""
    from fod.backbone import Backbone
    with pytest.warns(UserWarning, match="RANDOMLY"):
        assert Backbone("resnet18", ["layer1"], pretrained=False).mean == pytest.approx(tuple(IMAGENET_MEAN))
    with pytest.warns(UserWarning, match="RANDOMLY"):
        bit = Backbone("resnetv2_50x1_bit", ["stages.0"], pretrained=False)
    assert bit.mean == (0.5, 0.5, 0.5) and bit.std == (0.5, 0.5, 0.5)
    _img(tmp_path / "g.png", size=8, value=51)
    x = load_image(tmp_path / "g.png", 8, mean=bit.mean, std=bit.std)
    np.testing.assert_allclose(x[:, 0, 0].numpy(), (51 / 255 - 0.5) / 0.5, rtol=1e-6)


def test_probed_layout_details(mvtec, tmp_path, monkeypatch):
    # an upper-case mask extension was reported as a missing mask
    (mvtec / "ground_truth/crack/000_mask.png").rename(mvtec / "ground_truth/crack/000_mask.PNG")
    assert list_samples(mvtec, "test")[0].mask.name == "000_mask.PNG"
    # a file given as the dataset folder: say so, not "not found"
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        list_samples(tmp_path / "f", "train")
    # a full disk while the demo data is written names the file
    import errno

    from fod.files import WriteError

    def full(self, fp, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(WriteError, match=r"cannot write .*train/good/000\.png: No space left on device \(ENOSPC\)"):
        make_dataset(tmp_path / "syn", size=16, n_train=1, n_test_good=1, n_test_defect=1)
