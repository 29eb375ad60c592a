"""examples/anomaly_transformer.py: the official datasets' file layouts, windows, metrics, and a brief run."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.preprocessing import StandardScaler

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "anomaly_transformer.py"


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("anomaly_transformer_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(root, name, train, test, labels):
    """The official loaders' layout (data_factory/data_loader.py)."""
    root.mkdir(parents=True, exist_ok=True)
    if name == "PSM":  # csv with a header; column 0 is the time stamp; an empty field is a missing value
        for fname, arr in (("train.csv", train), ("test.csv", test), ("test_label.csv", labels[:, None])):
            cols = ["timestamp_(min)"] + [f"f{i}" for i in range(arr.shape[1])]
            rows = [",".join([str(1000 + i)] + ["" if np.isnan(v) else repr(float(v)) for v in r])
                    for i, r in enumerate(arr)]
            (root / fname).write_text("\n".join([",".join(cols)] + rows) + "\n")
    else:
        np.save(root / f"{name}_train.npy", train)
        np.save(root / f"{name}_test.npy", test)
        np.save(root / f"{name}_test_label.npy", labels)


@pytest.mark.parametrize("name", ["SMD", "MSL", "SMAP", "PSM"])
def test_official_layouts_load_and_standardise_as_the_official_loaders(ex, tmp_path, name):
    rng = np.random.default_rng(1)
    train, test = rng.normal(3, 2, (60, 4)), rng.normal(3, 2, (40, 4))
    train[:, 2] = 7.0  # a constant channel
    labels = (rng.random(40) < 0.2).astype(np.float64 if name == "PSM" else bool)
    if name == "PSM":
        train[5, 1] = test[7, 3] = np.nan
    _write(tmp_path / name, name, train, test, labels)
    tr, te, lab = ex.load_official(name, tmp_path / name)
    raw_tr, raw_te = np.nan_to_num(train), np.nan_to_num(test)  # PSM's loader: nan_to_num, then the scaler
    sc = StandardScaler().fit(raw_tr)
    assert tr.dtype == np.float32 and np.allclose(tr, sc.transform(raw_tr), atol=1e-5)
    assert np.allclose(te, sc.transform(raw_te), atol=1e-5)
    assert lab.shape == (40,) and np.array_equal(lab, labels.astype(np.int64))


@settings(max_examples=30)
@given(n=st.integers(1, 60), win=st.integers(1, 12), stride=st.integers(1, 15))
def test_windows_are_the_official_ones(ex, n, win, stride):
    if n < win:
        return
    series = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    w = ex.windows(series, win, stride)
    assert len(w) == (n - win) // stride + 1
    for i in range(len(w)):
        assert torch.equal(w[i], torch.from_numpy(series[i * stride: i * stride + win]))


@settings(max_examples=60)
@given(gt=st.lists(st.integers(0, 1), min_size=1, max_size=40), seed=st.integers(0, 2**16))
def test_point_adjust_marks_exactly_the_detected_segments(ex, gt, seed):
    gt = np.array(gt)
    pred = (np.random.default_rng(seed).random(len(gt)) < 0.2).astype(np.int64)
    adj = ex.point_adjust(pred, gt)
    assert (adj >= pred).all() and np.array_equal(adj[gt == 0], pred[gt == 0])
    i = 0
    while i < len(gt):
        j = i
        while j < len(gt) and gt[j] == gt[i]:
            j += 1
        if gt[i] == 1:
            assert (adj[i:j] == 1).all() if pred[i:j].any() else not adj[i:j].any()
        i = j


def test_the_honest_threshold_never_sees_the_test_set(ex):
    from sklearn.metrics import precision_recall_fscore_support
    rng = np.random.default_rng(0)
    train_e, labels = rng.random(500), (rng.random(300) < 0.1).astype(np.int64)
    for test_e in (rng.random(300) + labels, 10 * (rng.random(300) + labels)):  # same train, any test energies
        pred = (test_e > np.percentile(train_e, 95.0)).astype(np.int64)
        p, r, f, _ = precision_recall_fscore_support(labels, pred, average="binary", zero_division=0)
        res = ex.evaluate(train_e, test_e, labels, 5.0)
        assert (res["honest"]["precision"], res["honest"]["recall"], res["honest"]["f1"]) == (p, r, f)
    perfect = ex.evaluate(train_e, labels.astype(float) * 2, labels, 5.0)["honest"]
    assert perfect["auroc"] == 1.0 and perfect["auprc"] == 1.0


def _check(res):
    for proto in ("official", "honest"):
        for key, val in res[proto].items():
            assert math.isnan(val) or 0.0 <= val <= 1.0, (proto, key, val)


def test_demo_runs_briefly(ex, capsys):
    threads = torch.get_num_threads()
    try:
        res = ex.main(["--epochs", "1", "--max-train-windows", "8", "--d-model", "16", "--e-layers", "1",
                       "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "official protocol" in out and "honest" in out and "AUROC" in out
    _check(res)
    assert 0.0 <= res["honest"]["auroc"] <= 1.0


def test_runs_on_files_in_the_official_layout(ex, tmp_path):
    rng = np.random.default_rng(2)
    t = np.arange(300)
    train = np.sin(t[:, None] / 5 + np.arange(3)) + 0.1 * rng.standard_normal((300, 3))
    test = train[:200].copy()
    labels = np.zeros(200, dtype=bool)
    test[50:55] += 4
    labels[50:55] = True
    _write(tmp_path / "MSL", "MSL", train, test, labels)
    threads = torch.get_num_threads()
    try:
        res = ex.main(["--dataset", "MSL", "--data-path", str(tmp_path / "MSL"), "--win-size", "20", "--epochs", "1",
                       "--max-train-windows", "8", "--d-model", "8", "--n-heads", "2", "--e-layers", "1",
                       "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    _check(res)


@pytest.mark.parametrize("argv, match", [
    (["--dataset", "SMD"], "needs --data-path"),
    (["--dataset", "PSM", "--data-path", "/nonexistent"], "lacks train.csv"),
    (["--data-path", "/tmp"], "generated"),
    (["--d-model", "10", "--n-heads", "3"], "not divisible"),
    (["--win-size", "5000"], "longer than the series"),
    (["--backend", "gpu"], "choose auto or one of"),
])
def test_user_errors_are_one_line_and_exit_2(ex, capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        ex.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "error:" in err and match in err, err
