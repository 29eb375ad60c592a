"""End to end through the command line on a tiny generated dataset: train, test, predict, resume, compat."""
import json
import os

import pytest
import torch

import helpers

from fod import checkpoint as C
from fod.cli import build_parser, main

TINY = helpers.TINY


@pytest.fixture(scope="module")
def data(category):
    return category(n_train=7)  # 7 training images with batch 4: the last batch is short


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
    a = C.load_raw(straight / "checkpoint.pt")
    b = C.load_raw(resumed / "checkpoint.pt")
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
    ck = C.load_raw(out / "checkpoint.pt")
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


# ----------------------------------------------------------------------------- clear errors, early (issue 11)

@pytest.mark.parametrize("bad,needle", [
    (["--lr", "nan"], "--lr must be a finite number, got nan"), (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr", "0"], "--lr must be > 0"), (["--lambda1", "-1"], "--lambda1 must be >= 0"),
    (["--lambda2", "nan"], "--lambda2 must be a finite number"), (["--layers", "0"], "--layers must be >= 1"),
    (["--heads", "0"], "--heads must be >= 1"), (["--eps", "0"], "--eps must be > 0"),
    (["--seed", "-1"], "--seed must be >= 0"), (["--epochs", "-1"], "--epochs must be >= 0"),
    (["--levels", "layer2,layer2"], "--levels names a level twice"), (["--batch-size", "0"], "--batch-size must"),
    (["--image-size", "32", "--resize", "16"], "--resize must be >= 32"), (["--device", "gpu"], "--device must be"),
    (["--d-model", "6,6"], "--d-model 6 must be a multiple of 4"),
    (["--workers", "-1"], "--workers must be >= 0"), (["--heatmaps", "-2"], "--heatmaps must be >= -1"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    (["--image-size", "100000"], "--image-size must be <= 4096"), (["--device", "cuda:99"], "CUDA device(s)"),
    (["--backbone", "resnet_nope"], "unknown backbone 'resnet_nope': not a timm model name"),
])
def test_bad_options_are_one_line_errors_and_write_nothing(data, tmp_path, capsys, bad, needle):
    out = tmp_path / "o"
    args = TINY
    overridden = {bad[i] for i in range(0, len(bad), 2) if bad[i].startswith("--")}
    base = []
    i = 0
    while i < len(args):  # TINY without the options this case overrides
        if args[i] in overridden:
            i += 1 if args[i] == "--no-pretrained" else 2
            continue
        base.append(args[i])
        i += 1
    assert main(["train", "--data", str(data), "--output", str(out), *base, *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fod train: error: ") and needle in err and "\n" not in err, err
    assert not out.exists()


def test_output_folder_errors(data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out, needle in ((tmp_path / "file", "exists and is not a folder"),
                        (tmp_path / "file" / "run", "is a file, not a folder"),
                        ("/proc/1/fod-out", "cannot create output folder /proc/1/fod-out: /proc/1 is not writable")):
        assert main(["train", "--data", str(data), "--output", str(out), *TINY, "--epochs", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fod train: error: ") and needle in err and "\n" not in err, err


def test_output_inside_the_dataset_is_refused(data, tmp_path, capsys):
    assert main(["train", "--data", str(data), "--output", str(data / "test" / "run"), *TINY]) == 2
    assert "is inside the dataset folder" in capsys.readouterr().err
    assert not (data / "test" / "run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_output_folder(data, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["train", "--data", str(data), "--output", str(ro / "run"), *TINY, "--epochs", "1"]) == 2
        assert "is not writable (Permission denied (EACCES))" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def test_hints_fit_the_command(data, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "summary.png").write_bytes(b"")
    assert main(["test", "--data", str(data), "--checkpoint", str(tmp_path / "none.pt"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds metrics.json, summary.png; pass --overwrite to replace them" in err and "--resume" not in err
    assert main(["train", "--data", str(data), "--output", str(out), *TINY]) == 2
    assert "holds the results of fod test" in capsys.readouterr().err


def test_interrupt_is_not_a_traceback(data, tmp_path, capsys, monkeypatch):
    import fod.train

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(fod.train, "train", interrupted)
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "o"), *TINY]) == 130
    assert capsys.readouterr().err.strip() == "fod train: interrupted (SIGINT)"


def test_demo_options_are_checked_before_anything_is_written(tmp_path, capsys):
    for bad, needle in ((["--train-images", "0"], "--train-images must be >= 1"), (["--layers", "0"], "--layers")):
        assert main(["demo", "--output", str(tmp_path / "d"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fod demo: error: ") and needle in err
        assert not (tmp_path / "d").exists()


def test_empty_output_is_refused(data, capsys):
    assert main(["train", "--data", str(data), "--output", "", *TINY]) == 2
    assert "--output is empty" in capsys.readouterr().err


def test_heads_must_divide_the_default_width(data, tmp_path, capsys):
    tiny = [a for i, a in enumerate(TINY) if a != "--d-model" and (i == 0 or TINY[i - 1] != "--d-model")]
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "o"), *tiny, "--heads", "3"]) == 2
    err = capsys.readouterr().err
    assert "--heads 3 does not divide the model width 512 of level layer1 (the default for its 8x8 grid)" in err
