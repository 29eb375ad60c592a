"""Calibration (held-out split, thresholds, normalised scores, decision metrics) and the Python API (fod.Detector):
against brute-force and independent computations, and end to end through the command line."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import helpers

from fod import checkpoint as C
from fod import Detector
from fod import calibrate as CAL
from fod.cli import main
from fod.config import Config
from fod.synthetic import make_dataset

ROOT = Path(__file__).resolve().parents[2]
TINY = [*helpers.TINY, "--epochs", "1"]
TINY_KW = dict(backbone="resnet18", levels=["layer1", "layer2"], pretrained=False, image_size=32, d_model=[16, 16],
               n_heads=2, n_layers=1, batch_size=4, lr=1e-3, backend="reference", epochs=1)


# ----------------------------------------------------------------------------- thresholds, brute force

def _brute_fpr_threshold(s, fpr):
    """The smallest of the scores t such that at most floor(n * fpr) scores exceed it."""
    allowed = math.floor(len(s) * fpr + 1e-9)
    return min(t for t in s if sum(x > t for x in s) <= allowed)


@given(st.lists(st.integers(0, 20), min_size=1, max_size=60), st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.25, 0.5]))
def test_threshold_at_fpr_is_the_smallest_admissible_score(ints, fpr):
    s = [x / 7 for x in ints]  # ties included
    t, above = CAL.threshold_at_fpr(s, fpr)
    assert t == _brute_fpr_threshold(s, fpr)
    assert above == sum(x > t for x in s) <= math.floor(len(s) * fpr + 1e-9)


def test_threshold_at_fpr_small_samples():
    s = [3.0, 1.0, 2.0, 6.0, 5.0, 4.0]
    assert CAL.threshold_at_fpr(s, 0.01) == (6.0, 0)  # 6 normal images at 1%: the max
    assert CAL.threshold_at_fpr(s, 1 / 6) == (5.0, 1)  # n * fpr = 1: one may exceed
    s100 = np.arange(100.0)
    assert CAL.threshold_at_fpr(s100, 0.01) == (98.0, 1)
    assert CAL.threshold_at_fpr(s100, 0.03) == (96.0, 3)  # 100 * 0.03 = 3.0000000000000004: not 2
    with pytest.raises(ValueError, match="no normal scores"):
        CAL.threshold_at_fpr([], 0.01)


def _f1(y, s, t):
    return CAL.decision_metrics(y, s, t)["f1"]


@given(st.lists(st.tuples(st.integers(0, 12), st.booleans()), min_size=1, max_size=40))
def test_f1_threshold_is_optimal(pairs):
    s = np.array([p[0] / 3 for p in pairs])
    y = np.array([p[1] for p in pairs])
    if not y.any():
        with pytest.raises(ValueError):
            CAL.f1_threshold(y, s)
        return
    t, c = CAL.f1_threshold(y, s)
    u = np.unique(s)
    candidates = np.r_[u[0] - 1, (u[:-1] + u[1:]) / 2, u[-1] + 1]  # every distinct decision
    best = max(_f1(y, s, c_) for c_ in candidates)
    assert _f1(y, s, t) == pytest.approx(best) == pytest.approx(c["f1"])
    # the highest threshold among equally good ones, placed strictly between two scores (or below all)
    assert not np.any(s == t)
    better_higher = [c_ for c_ in candidates if c_ > t and _f1(y, s, c_) == pytest.approx(best)]
    assert all(not np.any((s > t) & (s <= c_)) for c_ in better_higher)


def test_decision_metrics_by_hand():
    m = CAL.decision_metrics([0, 0, 1, 1, 1], [0.1, 0.6, 0.4, 0.7, 0.9], 0.5)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 1)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["fpr"] == pytest.approx(0.5)
    none = CAL.decision_metrics([0, 1], [0.1, 0.2], 5.0)  # nothing called anomalous
    assert none["precision"] == 0.0 and none["f1"] == 0.0 and none["recall"] == 0.0


@given(st.lists(st.floats(0, 10), min_size=1, max_size=30), st.floats(0, 12))
def test_normalized_score_is_monotone_with_half_at_the_threshold(normal, t):
    norm = CAL.normalization(t, CAL.normal_stats(normal))
    assert norm["width"] > 0
    assert CAL.normalize([t], norm)[0] == 0.5
    xs = np.linspace(-100, 100, 2001)
    v = CAL.normalize(xs, norm)
    assert np.all((v >= 0) & (v <= 1)) and np.all(np.diff(v) >= 0)
    if norm["width_from"].startswith("(threshold"):  # t above the normal median: the median maps to 0.1
        assert CAL.normalize([np.median(normal)], norm)[0] == pytest.approx(0.1, rel=1e-6)
    else:
        assert t <= np.median(normal) or (t - np.median(normal)) / math.log(9) < np.finfo(float).tiny


# ----------------------------------------------------------------------------- which images calibrate

def test_holdout_split_is_deterministic_disjoint_and_rounded():
    assert [CAL.holdout_count(n, 0.1) for n in (4, 5, 14, 15, 60)] == [1, 1, 1, 2, 6]  # half up, at least 1
    with pytest.raises(ValueError, match="leaves none to train on"):
        CAL.holdout_count(1, 0.1)
    fit, held = CAL.split_indices(60, 0.1, seed=0)
    assert len(held) == 6 and sorted(fit + held) == list(range(60))
    assert CAL.split_indices(60, 0.1, seed=0) == (fit, held)
    assert CAL.split_indices(60, 0.1, seed=1)[1] != held


def test_plan_precedence(tmp_path):
    (tmp_path / "valdir").mkdir()
    cat = tmp_path / "cat3d"
    (cat / "validation" / "good" / "rgb").mkdir(parents=True)
    assert CAL.plan(Config(data="x"))["source"] == "holdout" and CAL.plan(Config(data="x"))["fraction"] == 0.1
    assert CAL.plan(Config(data="x", val_fraction=0.0))["source"] == "none"
    assert CAL.plan(Config(data="x", val=str(tmp_path / "valdir")))["source"] == "val_dir"
    assert CAL.plan(Config(data=str(cat), dataset="mvtec3d"))["source"] == "validation_split"
    p = CAL.plan(Config(data=str(cat), dataset="mvtec3d", val_fraction=0.2))
    assert p["source"] == "holdout" and "not used" in p["note"]
    with pytest.raises(ValueError, match="alternatives"):
        Config(data="x", val=str(tmp_path / "valdir"), val_fraction=0.2).check()
    with pytest.raises(FileNotFoundError, match="--val folder not found"):
        Config(data="x", val=str(tmp_path / "nope")).check()
    for bad in (dict(val_fraction=1.0), dict(val_fraction=-0.1), dict(fpr=0.6), dict(fpr=-1e-3)):
        with pytest.raises(ValueError):
            Config(data="x", **bad).check()


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def data(category):
    return category(n_test_good=3)


@pytest.fixture(scope="module")
def run(data, trained):
    return trained(data, "--epochs", "1", "--val-fraction", "0.3")


def test_held_out_images_calibrate_and_neither_train_nor_build_the_memory(data, run):
    ck = C.load_raw(run / "checkpoint.pt")
    cal = ck["calibration"]
    fit, held = CAL.split_indices(10, 0.3, seed=0)
    names = sorted(p.name for p in (data / "train" / "good").iterdir())
    assert cal["held_out"] == [f"train/good/{names[i]}" for i in held] and len(held) == 3
    det = Detector.load(run / "checkpoint.pt")
    # the reference memory is the mean of the features of the 7 training images, not of all 10
    with torch.no_grad():
        toks = det.fod.tokens(torch.stack([det.preprocess.image(data / "train/good" / names[i]) for i in fit]))
    for mem, t in zip(ck["memory"], toks):
        torch.testing.assert_close(mem, t.mean(0), rtol=1e-5, atol=1e-6)
    # the thresholds are the order statistics of the held-out images' own scores (3 normals at fpr 0.01: the max)
    preds = list(det.predict([data / "train/good" / names[i] for i in held]))
    assert cal["image_threshold"] == max(p.score for p in preds)
    pixels = np.sort(np.concatenate([p.anomaly_map.ravel() for p in preds]))  # 3072 pixels: 30 may exceed at 1%
    assert cal["pixel_threshold"] == pixels[-31]
    assert cal["normal_image_scores"]["count"] == 3 and cal["fpr_target"] == 0.01
    assert cal["image_fpr_on_calibration"] == 0.0 and "F1" not in cal["image_method"]


def test_train_and_test_report_the_thresholds_decisions(data, run, tmp_path):
    m = json.loads((run / "metrics.json").read_text())
    t = m["thresholds"]
    assert t["image"]["threshold"] == m["calibration"]["image_threshold"]
    for level in ("image", "pixel"):
        assert {"precision", "recall", "f1", "fpr", "tp", "fp", "fn", "tn"} <= set(t[level])
    n_img = 3 + 3  # 3 good, 1 per defect type
    assert sum(t["image"][k] for k in ("tp", "fp", "fn", "tn")) == n_img
    assert sum(t["pixel"][k] for k in ("tp", "fp", "fn", "tn")) == n_img * 32 * 32
    out = tmp_path / "test"
    assert main(["test", "--data", str(data), "--checkpoint", str(run / "checkpoint.pt"), "--output", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["thresholds"] == t


def test_predict_command_writes_decisions_masks_and_matches_the_api(data, run, tmp_path, capsys):
    imgs = [str(data / "test/good/000.png"), str(data / "test/cut/000.png"), str(data / "test/spot/000.png")]
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(run / "checkpoint.pt"), *imgs, "--output", str(out),
                 "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    s = json.loads((out / "scores.json").read_text())
    cal = s["calibration"]
    maps = np.load(out / "maps.npz")
    preds = list(Detector.load(run / "checkpoint.pt").predict(imgs))
    for p in preds:
        r = s["images"][p.source]
        assert r["score"] == p.score and r["normalized_score"] == p.normalized_score and r["anomalous"] == p.anomalous
        assert (r["normalized_score"] > 0.5) == r["anomalous"] == (r["score"] > cal["image_threshold"])
        np.testing.assert_array_equal(maps[r["map_key"]], p.anomaly_map)
        mask = np.asarray(Image.open(r["mask"]))
        np.testing.assert_array_equal(mask, np.where(p.anomaly_map > cal["pixel_threshold"], 255, 0))
        assert Path(r["heatmap"]).is_file()
        assert ("ANOMALOUS" if p.anomalous else "normal") in [ln for ln in err.splitlines() if p.source in ln][0]


def test_uncalibrated_model_reports_raw_scores_only(data, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.warns(UserWarning):
        assert main(["train", "--data", str(data), "--output", str(run), *TINY, "--val-fraction", "0"]) == 0
    assert C.load_raw(run / "checkpoint.pt")["calibration"] is None
    assert json.loads((run / "metrics.json").read_text())["thresholds"] is None
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(run / "checkpoint.pt"), str(data / "test/good/000.png"),
                 "--output", str(out)]) == 0
    assert "raw scores only" in capsys.readouterr().err
    r = next(iter(json.loads((out / "scores.json").read_text())["images"].values()))
    assert r["normalized_score"] is None and r["anomalous"] is None and r["mask"] is None
    assert not (out / "masks").exists()
    p = Detector.load(run / "checkpoint.pt").predict_one(data / "test/good/000.png")
    assert p.normalized_score is None and p.anomalous is None and p.mask is None and p.score == r["score"]


def test_val_folder_calibrates_and_every_training_image_trains(data, tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    for i in range(2):
        (val / f"{i}.png").write_bytes((data / "test/good" / f"{i:03d}.png").read_bytes())
    det = Detector.fit(data, output=tmp_path / "run", val=str(val), **TINY_KW)
    cal = det.calibration
    assert cal["source"] == "val_dir" and cal["images"] == 2 and "held_out" not in cal
    scores = [p.score for p in det.predict(sorted(val.iterdir()))]
    assert cal["image_threshold"] == max(scores)
    assert det.metrics["thresholds"]["image"]["threshold"] == cal["image_threshold"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        Detector.fit(data, output=tmp_path / "r2", val=str(tmp_path / "empty"), **TINY_KW)
    assert not (tmp_path / "r2").exists()  # refused before anything was written


def test_labelled_validation_split_gives_f1_thresholds(tmp_path):
    """MVTec 3D-AD layout (train|validation|test/<type>/rgb, gt) with defects in validation: F1-optimal."""
    syn = make_dataset(tmp_path / "syn", size=32, n_train=6, n_test_good=3, n_test_defect=2, seed=1,
                       defects=("spot",))
    cat = tmp_path / "cat3d"
    for split, kinds in (("train", ("good",)), ("validation", ("good", "spot")), ("test", ("good", "spot"))):
        for kind in kinds:
            src = syn / ("train" if split == "train" else "test") / kind
            (cat / split / kind / "rgb").mkdir(parents=True)
            for p in sorted(src.iterdir()):
                (cat / split / kind / "rgb" / p.name).write_bytes(p.read_bytes())
                if kind != "good":
                    (cat / split / kind / "gt").mkdir(exist_ok=True)
                    m = syn / "ground_truth" / kind / f"{p.stem}_mask.png"
                    (cat / split / kind / "gt" / p.name).write_bytes(m.read_bytes())
    det = Detector.fit(cat, output=tmp_path / "run", dataset="mvtec3d", **TINY_KW)
    cal = det.calibration
    assert cal["source"] == "validation_split" and cal["defective_images"] == 2 and cal["normal_images"] == 3
    assert "F1-optimal" in cal["image_method"] and "F1-optimal" in cal["pixel_method"]
    ds = [p for k in ("good", "spot") for p in sorted((cat / "validation" / k / "rgb").iterdir())]
    preds = list(det.predict(ds))
    y = [0, 0, 0, 1, 1]
    s = [p.score for p in preds]
    u = np.unique(s)
    best = max(CAL.decision_metrics(y, s, t)["f1"] for t in np.r_[u[0] - 1, u])
    assert CAL.decision_metrics(y, s, cal["image_threshold"])["f1"] == pytest.approx(best)


# ----------------------------------------------------------------------------- the Detector's inputs

@pytest.fixture(scope="module")
def det(run):
    return Detector.load(run / "checkpoint.pt")


def test_every_input_kind_gives_the_path_result(det, data):
    path = data / "test/cut/000.png"
    want = det.predict_one(path)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    same = [Image.open(path), torch.from_numpy(rgb).permute(2, 0, 1), rgb, det.preprocess.image(path)]
    got = list(det.predict(same[:3])) + [det.predict_one(same[3], preprocessed=True)]
    for g in got:
        assert g.score == want.score and g.anomalous == want.anomalous
        np.testing.assert_array_equal(g.anomaly_map, want.anomaly_map)
        np.testing.assert_array_equal(g.mask, want.mask)
    assert [g.source for g in got[:3]] == ["<PIL image 0>", "<tensor 1>", "<array 2>"]
    batch = torch.from_numpy(np.stack([rgb, rgb])).permute(0, 3, 1, 2)  # (N, C, H, W) uint8
    assert [p.score for p in det.predict(batch)] == [want.score] * 2
    # a float image in 0..1 is resized in float precision: close to the 8-bit result, not identical
    f = det.predict_one(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert abs(f.score - want.score) <= 0.05 * abs(want.score)
    grey = det.predict_one(np.asarray(Image.open(path).convert("L")))
    assert grey.anomaly_map.shape == (32, 32)


def test_bad_inputs_are_named_errors(det, data):
    rgb = torch.rand(3, 40, 50)
    with pytest.raises(ValueError, match=r"<tensor 0>: float pixels must be finite and in 0..1.*preprocessed=True"):
        det.predict_one((rgb - 0.5) * 4)
    with pytest.raises(ValueError, match="3 \\(RGB\\) or 1 \\(grey\\) channels"):
        det.predict_one(torch.rand(4, 8, 8))
    with pytest.raises(ValueError, match=r"preprocessed image is a float tensor \(3, 32, 32\)"):
        det.predict_one(torch.rand(3, 40, 40), preprocessed=True)
    with pytest.raises(ValueError, match="preprocessed=True takes torch tensors"):
        det.predict_one(data / "test/good/000.png", preprocessed=True)
    with pytest.raises(TypeError, match="cannot predict on a int"):
        list(det.predict([1]))
    with pytest.raises(ValueError, match="uint8 \\(0..255\\) or floating point"):
        det.predict_one(np.zeros((8, 8, 3), np.int32))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        det.predict_one("missing.png")
    with pytest.raises(ValueError, match="--batch-size"):
        det.predict([data / "test/good/000.png"], batch_size=0)


def test_predict_is_lazy_and_batch_invariant(det, data):
    paths = sorted((data / "test").glob("*/*.png"))
    pulled = []

    def source():
        for p in paths:
            pulled.append(p)
            yield p

    it = det.predict(source(), batch_size=2)
    assert pulled == []  # nothing read before the first result is asked for
    first = next(it)
    assert len(pulled) == 2  # one batch at a time
    rest = list(it)
    one = list(det.predict(paths, batch_size=1))
    assert [p.source for p in [first, *rest]] == [str(p) for p in paths] == [p.source for p in one]
    for a, b in zip([first, *rest], one):
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-5, atol=1e-7)


def test_fit_without_output_and_save(data, tmp_path):
    det = Detector.fit(data, val_fraction=0.3, **TINY_KW)
    assert det.checkpoint_path is None and det.metrics["thresholds"] is not None
    path = det.save(tmp_path / "ck.pt")
    again = Detector.load(path)
    p = data / "test/good/000.png"
    assert again.predict_one(p).score == det.predict_one(p).score
    assert again.image_threshold == det.image_threshold
    with pytest.raises(ValueError, match="unknown key\\(s\\) epoch\\b"):
        Detector.fit(data, epoch=3)


def test_docs_python_api_example_runs(tmp_path):
    """docs/pipeline.md's "Python API" example, as written, in a fresh process (working folder: a temporary one)."""
    text = (ROOT / "docs" / "pipeline.md").read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(ROOT), "FOD_THREADS": "2"}
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "anomalous" in r.stdout and "threshold" in r.stdout
