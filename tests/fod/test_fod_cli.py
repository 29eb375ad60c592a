"""End to end through the command line on a tiny generated dataset: train, test, predict, resume, compat."""
import json

import pytest
import torch

from fod.cli import build_parser, main
from fod.synthetic import make_dataset

TINY = ["--backbone", "resnet18", "--levels", "layer1,layer2", "--no-pretrained", "--image-size", "32",
        "--d-model", "16,16", "--heads", "2", "--layers", "1", "--batch-size", "4", "--lr", "1e-3",
        "--backend", "reference", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 7 training images with batch 4: the last batch is short
    return make_dataset(tmp_path_factory.mktemp("syn") / "cat", size=32, n_train=7, n_test_good=2,
                        n_test_defect=1, seed=0)


def _train(data, out, *extra):
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        return main(["train", "--data", str(data), "--output", str(out), *TINY, *extra])


def test_train_test_predict(data, tmp_path):
    out = tmp_path / "run"
    assert _train(data, out, "--epochs", "1") == 0
    m = json.loads((out / "metrics.json").read_text())
    for k in ("image_auroc", "pixel_auroc", "aupro", "per_type_image_auroc", "config", "versions",
              "train_seconds", "weights"):
        assert k in m, k
    assert set(m["per_type_image_auroc"]) == {"scratch", "spot", "cut"}
    assert 0 <= m["image_auroc"] <= 1 and 0 <= m["aupro"] <= 1
    assert m["protocol"].startswith("honest") and "random init" in m["weights"]
    assert (out / "summary.png").stat().st_size > 10_000
    assert len(list((out / "heatmaps").glob("*.png"))) == 5
    assert not list(out.glob("*.tmp"))

    # the same output again: refused, nothing lost
    before = (out / "metrics.json").read_text()
    assert main(["train", "--data", str(data), "--output", str(out), *TINY, "--epochs", "1"]) == 2
    assert (out / "metrics.json").read_text() == before

    # fod test reproduces the training run's final evaluation from the checkpoint alone
    tout = tmp_path / "test"
    assert main(["test", "--data", str(data), "--checkpoint", str(out / "checkpoint.pt"), "--output", str(tout),
                 "--backend", "reference"]) == 0
    t = json.loads((tout / "metrics.json").read_text())
    for k in ("image_auroc", "pixel_auroc", "aupro"):
        assert t[k] == pytest.approx(m[k], abs=1e-6)

    # predict on new images
    pout = tmp_path / "pred"
    imgs = [str(data / "test/good/000.png"), str(data / "test/cut/000.png")]
    assert main(["predict", "--checkpoint", str(out / "checkpoint.pt"), *imgs, "--output", str(pout)]) == 0
    s = json.loads((pout / "scores.json").read_text())
    assert set(s["images"]) == set(imgs)
    assert all((pout / "heatmaps" / f"{n}.png").exists() for n in ("000", "000_1"))
    maps = __import__("numpy").load(pout / "maps.npz")
    assert maps["000"].shape == (32, 32)
    assert main(["predict", "--checkpoint", str(out / "checkpoint.pt"), "missing.png", "--output",
                 str(tmp_path / "p2")]) == 2


def test_resume_continues_to_the_same_result(data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(data, straight, "--epochs", "2") == 0
    assert _train(data, resumed, "--epochs", "1") == 0
    # resuming rebuilds the backbone from the checkpoint (no second random-init warning)
    assert main(["train", "--data", str(data), "--output", str(resumed), *TINY, "--epochs", "2", "--resume"]) == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["models"]:
        torch.testing.assert_close(a["models"][k], b["models"][k], rtol=0, atol=0, msg=k)
    ma = json.loads((straight / "metrics.json").read_text())
    mb = json.loads((resumed / "metrics.json").read_text())
    assert ma["image_auroc"] == mb["image_auroc"] and ma["pixel_auroc"] == mb["pixel_auroc"]
    assert [h["loss"] for h in ma["history"]] == [h["loss"] for h in mb["history"]]
    # resuming with another model configuration is refused
    assert main(["train", "--data", str(data), "--output", str(resumed), *TINY, "--epochs", "3", "--resume",
                 "--lr", "1e-2"]) == 2


def test_compat_official_is_flagged(data, tmp_path):
    out = tmp_path / "compat"
    assert _train(data, out, "--epochs", "1", "--compat-official") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["protocol"].startswith("COMPAT-OFFICIAL") and "TEST set" in m["warning"]
    assert m["image_auroc_epoch"] == 1 and "final_epoch" in m and len(m["per_epoch"]) == 1
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert not any("intra_out" in k for k in ck["models"])  # the output projection is discarded


def test_help_is_there():
    p = build_parser()
    text = p.format_help()
    assert "fod demo" in text and "fod train" in text
    for cmd in ("train", "test", "predict", "demo"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])


def test_uncached_features_give_the_same_training(data, tmp_path):
    a, b = tmp_path / "cached", tmp_path / "uncached"
    assert _train(data, a, "--epochs", "1", "--heatmaps", "0") == 0
    assert _train(data, b, "--epochs", "1", "--heatmaps", "0", "--no-cache-features") == 0
    ha = json.loads((a / "metrics.json").read_text())["history"]
    hb = json.loads((b / "metrics.json").read_text())["history"]
    assert ha[0]["loss"] == pytest.approx(hb[0]["loss"], rel=1e-5)
    assert not list((b / "heatmaps").glob("*.png"))
