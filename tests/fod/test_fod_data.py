"""Dataset layouts (MVTec AD, BTAD, MVTec 3D-AD), preprocessing, error cases, the synthetic generator,
backbone weights."""
import numpy as np
import pytest
import torch
from PIL import Image

from fod.data import IMAGENET_MEAN, IMAGENET_STD, AnomalyDataset, list_samples, load_image
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
