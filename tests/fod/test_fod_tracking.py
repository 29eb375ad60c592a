"""Training runs you can watch and compare (issue 24, fod.tracking): RUN/log.csv read back with the csv module and
the TensorBoard event files with tensorboard's own reader (EventAccumulator): the tags, the number of points, the
values the training loop computed, resumed runs continuing their curves, rank-0-only writes."""
import csv
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers

import fod.train as TR
from fod import tracking as T
from fod.cli import main
from fod.synthetic import make_dataset

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator", reason="the tensorboard package reads the events"
).EventAccumulator

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]
TINY = [*helpers.TINY, "--heatmaps", "0"]
# 8 training images, 1 held out for the calibration: 7 train in batches of 4 and 3, two steps per epoch
SPE = 2
TERMS = ("loss", "rec", "k_intra", "k_inter", "e_intra", "e_inter")
EPOCH_TAGS = {f"epoch/{k}" for k in (*TERMS, "lr", "seconds", "images_per_second")}
TEST_TAGS = {f"test/{k}" for k in ("image_auroc", "pixel_auroc", "aupro", "eval_images_per_second")}


@pytest.fixture(scope="module")
def data(category):
    return category(n_train=8)


def _main(*args) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-init warning
        return main([str(a) for a in args])


def _train(data, out, *extra) -> int:
    return _main("train", "--data", data, "--output", out, *TINY, *extra)


def _events(run) -> EventAccumulator:
    ea = EventAccumulator(str(Path(run) / T.EVENTS_NAME), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def _points(ea, tag) -> list:
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def _f32(x) -> float:
    """A value as TensorBoard stores it (float32)."""
    return float(np.float32(x))


def _csv(run) -> list[dict]:
    with open(Path(run) / T.CSV_NAME, newline="") as f:
        return list(csv.DictReader(f))


def _capture_steps(monkeypatch) -> list:
    """Every training step's values as the loop computed them, per epoch: [[(n_images, values), ...], ...]."""
    seen = []
    real = TR.train_epoch

    def train_epoch(*args, on_step=None, **kw):
        seen.append([])

        def hook(step, values):
            seen[-1].append(dict(values))
            if on_step is not None:
                on_step(step, values)
        return real(*args, on_step=hook, **kw)
    monkeypatch.setattr(TR, "train_epoch", train_epoch)
    return seen


def test_a_run_logs_what_the_loop_computed(data, tmp_path, monkeypatch):
    seen = _capture_steps(monkeypatch)
    out = tmp_path / "run"
    assert _train(data, out, "--epochs", "2") == 0
    m = json.loads((out / "metrics.json").read_text())
    hist = m["history"]
    assert [len(s) for s in seen] == [SPE, SPE]

    # log.csv: one row per epoch, the history's values exactly, the final metrics in the last epoch's row
    rows = _csv(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2] and [int(r["step"]) for r in rows] == [SPE, 2 * SPE]
    for r, h in zip(rows, hist):
        for k in (*TERMS, "lr", "seconds", "images_per_second"):
            assert float(r[k]) == h[k], (h["epoch"], k)
        assert float(r["lr"]) == 1e-3 and float(r["images_per_second"]) == pytest.approx(7 / h["seconds"])
    assert all(rows[0][f"test/{k}"] == "" for k in ("image_auroc", "aupro"))
    for k in ("image_auroc", "pixel_auroc", "aupro", "eval_images_per_second"):
        assert float(rows[-1][f"test/{k}"]) == m[k], k

    # the events: the same scalars per step and per epoch, the final metrics, four heat maps
    ea = _events(out)
    assert set(ea.Tags()["scalars"]) == {f"step/{k}" for k in TERMS} | EPOCH_TAGS | TEST_TAGS
    for k in TERMS:
        assert _points(ea, f"step/{k}") == [(e * SPE + s + 1, _f32(seen[e][s][k]))
                                            for e in range(2) for s in range(SPE)]
        assert _points(ea, f"epoch/{k}") == [(h["epoch"] * SPE, _f32(h[k])) for h in hist]
    for k in ("image_auroc", "pixel_auroc", "aupro"):
        assert _points(ea, f"test/{k}") == [(2 * SPE, _f32(m[k]))]
    images = ea.Tags()["images"]
    assert len(images) == T.HEATMAPS and all(t.startswith("test/") for t in images)
    assert all([e.step for e in ea.Images(t)] == [2 * SPE] for t in images)
    # the image and its heat map side by side (fod.viz.overlay), at the image size
    assert all((ea.Images(t)[0].height, ea.Images(t)[0].width) == (32, 2 * 32 + 4) for t in images)

    # the epoch's loss is the image-weighted mean of its steps' (batches of 4 and 3 of the 7 training images)
    for e, h in enumerate(hist):
        for k in TERMS:
            assert sum(w * v[k] for w, v in zip((4 / 7, 3 / 7), seen[e])) == pytest.approx(h[k], rel=1e-12)


def _fail_once(monkeypatch, name, when):
    """RunLog.<name> raises (a run dying there) the first time ``when(args)`` holds, after doing its work for
    train_step (the step is logged), before it for epoch (the checkpoint is written, its log is not)."""
    real = getattr(T.RunLog, name)
    fired = []

    def method(self, *args):
        if not fired and when(*args):
            fired.append(True)
            if name == "train_step":
                real(self, *args)
                self.flush()
            raise RuntimeError(f"injected: the run dies in RunLog.{name}")
        return real(self, *args)
    monkeypatch.setattr(T.RunLog, name, method)
    return fired


def test_resumed_runs_continue_the_curves(data, tmp_path, monkeypatch):
    straight, out = tmp_path / "straight", tmp_path / "resumed"
    assert _train(data, straight, "--epochs", "3") == 0
    assert _train(data, out, "--epochs", "1") == 0  # a finished run, evaluated after epoch 1
    with monkeypatch.context() as mp:  # dies after the checkpoint of epoch 2, before its log
        fired = _fail_once(mp, "epoch", lambda h: h["epoch"] == 2)
        assert _train(data, out, "--epochs", "3", "--resume") == 2 and fired
    assert [int(r["epoch"]) for r in _csv(out)] == [1]
    with monkeypatch.context() as mp:  # dies in epoch 3 after logging its first step (step 5; checkpoint: epoch 2)
        fired = _fail_once(mp, "train_step", lambda step, values: step == 2 * SPE + 1)
        assert _train(data, out, "--epochs", "3", "--resume") == 2 and fired
    assert [int(r["epoch"]) for r in _csv(out)] == [1, 2]  # the missing epoch, logged from the checkpoint
    assert _train(data, out, "--epochs", "3", "--resume") == 0

    a, b = _events(straight), _events(out)
    assert set(b.Tags()["scalars"]) == set(a.Tags()["scalars"])
    for k in TERMS:  # every step once, in order, with the uninterrupted run's values
        assert _points(b, f"step/{k}") == _points(a, f"step/{k}"), k
        assert [s for s, _ in _points(b, f"step/{k}")] == list(range(1, 3 * SPE + 1))
        assert _points(b, f"epoch/{k}") == _points(a, f"epoch/{k}"), k
    # the evaluation of each finished run: after epoch 1 and after epoch 3
    assert [s for s, _ in _points(b, "test/image_auroc")] == [SPE, 3 * SPE]
    assert _points(b, "test/image_auroc")[-1] == _points(a, "test/image_auroc")[0]
    ra, rb = _csv(straight), _csv(out)
    assert [r["epoch"] for r in rb] == ["1", "2", "3"]
    for x, y in zip(ra, rb):
        assert {k: x[k] for k in TERMS} == {k: y[k] for k in TERMS}
    assert rb[0]["test/image_auroc"] != "" and rb[1]["test/image_auroc"] == ""
    assert rb[2]["test/image_auroc"] == ra[2]["test/image_auroc"]


def test_a_damaged_log_is_said_before_the_resume_starts(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data, out, "--epochs", "1") == 0
    (out / T.CSV_NAME).write_text("epoch,loss\n1,not a number\n")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _train(data, out, "--epochs", "2", "--resume") == 2
    text = capsys.readouterr().err
    err = [line for line in text.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("fod train: error: ") and "is not a log written by fod" in err[0]
    assert "features" not in text  # before the feature extraction
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (out / T.CSV_NAME).unlink()  # rebuilt from the checkpoint's history
    assert _train(data, out, "--epochs", "2", "--resume") == 0
    assert [r["epoch"] for r in _csv(out)] == ["1", "2"]


def test_fod_test_logs_its_metrics_and_no_tensorboard_writes_none(data, tmp_path):
    run, tout = tmp_path / "run", tmp_path / "test"
    assert _train(data, run, "--epochs", "1", "--no-tensorboard") == 0
    assert not (run / T.EVENTS_NAME).exists() and len(_csv(run)) == 1
    assert _main("test", "--data", data, "--checkpoint", run / "checkpoint.pt", "--output", tout,
                 "--backend", "reference", "--heatmaps", "0") == 0
    m = json.loads((tout / "metrics.json").read_text())
    (row,) = _csv(tout)
    assert (row["epoch"], row["step"]) == ("1", str(SPE))
    ea = _events(tout)
    for k in ("image_auroc", "pixel_auroc", "aupro"):
        assert float(row[f"test/{k}"]) == m[k]
        assert _points(ea, f"test/{k}") == [(SPE, _f32(m[k]))]
    assert len(ea.Tags()["images"]) == T.HEATMAPS
    again = tmp_path / "test2"
    assert _main("test", "--data", data, "--checkpoint", run / "checkpoint.pt", "--output", again,
                 "--backend", "reference", "--heatmaps", "0", "--no-tensorboard") == 0
    assert not (again / T.EVENTS_NAME).exists() and (again / T.CSV_NAME).is_file()


def test_without_the_tensorboard_package_the_csv_and_one_note(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as when it is not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(T, "_noted", [])
    for run in ("a", "b"):
        assert _train(data, tmp_path / run, "--epochs", "1") == 0
        assert len(_csv(tmp_path / run)) == 1 and not (tmp_path / run / T.EVENTS_NAME).exists()
    assert capsys.readouterr().err.count("the tensorboard package is not installed") == 1


def test_a_killed_fresh_run_s_logs_do_not_block_a_new_run(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as mp:  # dies after its first step, before any checkpoint
        _fail_once(mp, "train_step", lambda step, values: step == 1)
        assert _train(data, out, "--epochs", "1") == 2
    assert (out / T.EVENTS_NAME).is_dir() and not (out / "checkpoint.pt").exists()
    assert _train(data, out, "--epochs", "1") == 0  # no --overwrite needed: the logs alone are no results
    assert [s for s, _ in _points(_events(out), "step/loss")] == [1, 2]  # the dead run's step 1 is dropped


def test_overwrite_replaces_the_logs_only_when_it_succeeds(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _train(data, out, "--epochs", "2") == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with monkeypatch.context() as mp:
        _fail_once(mp, "epoch", lambda h: h["epoch"] == 1)
        assert _train(data, out, "--epochs", "1", "--overwrite") == 2
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert _train(data, out, "--epochs", "1", "--overwrite") == 0
    assert len(_csv(out)) == 1 and [s for s, _ in _points(_events(out), "step/loss")] == [1, 2]
    assert len(list((out / T.EVENTS_NAME).iterdir())) == 1


def test_overwrite_after_resume_removes_the_old_events_and_no_user_file(data, tmp_path):
    """A run written in place (fresh, then resumed) lists its event files in the manifest: --overwrite removes
    them (no curves of two runs in one folder) and leaves a user's file in tensorboard/ alone."""
    out = tmp_path / "run"
    assert _train(data, out, "--epochs", "1") == 0
    assert _train(data, out, "--epochs", "2", "--resume") == 0
    (out / T.EVENTS_NAME / "notes.txt").write_text("mine")
    assert _train(data, out, "--epochs", "1", "--overwrite") == 0
    assert [s for s, _ in _points(_events(out), "step/loss")] == [1, 2]
    assert sorted(p.name.startswith("events.") for p in (out / T.EVENTS_NAME).iterdir()) == [False, True]
    assert (out / T.EVENTS_NAME / "notes.txt").read_text() == "mine"


def test_benchmark_adds_the_baselines_to_each_category_s_log(tmp_path):
    root = tmp_path / "root"
    for i, c in enumerate("ab"):
        make_dataset(root / c, size=32, n_train=8, n_test_good=2, n_test_defect=1, seed=i)
    out = tmp_path / "bench"
    assert _main("benchmark", "--data", root, "--output", out, *TINY, "--epochs", "1") == 0
    for c in "ab":
        base = json.loads((out / c / "baselines.json").read_text())["methods"]
        (row,) = _csv(out / c)
        ea = _events(out / c)
        for name, v in base.items():
            for k in ("image_auroc", "pixel_auroc", "aupro"):
                assert float(row[f"baseline/{name}/{k}"]) == v[k]
                assert _points(ea, f"baseline/{name}/{k}") == [(SPE, _f32(v[k]))]
        assert _points(ea, "epoch/loss")[0][0] == SPE


def test_the_demo_writes_both_logs_in_its_run_folder(tmp_path):
    out = tmp_path / "demo"
    assert _main("demo", "--output", out, "--train-images", "8", "--image-size", "32", "--epochs", "1",
                 "--d-model", "16", "--heads", "2", "--layers", "1", "--backend", "reference", "--heatmaps", "0") == 0
    assert len(_csv(out / "run")) == 1
    assert _points(_events(out / "run"), "epoch/loss")[0][0] == 1  # 7 training images, the demo's batch of 8


def test_only_rank_0_writes_under_torchrun(tmp_path):
    data = make_dataset(tmp_path / "cat", size=32, n_train=9, n_test_good=2, n_test_defect=1, seed=0)
    out = tmp_path / "run"
    args = ["train", "--data", data, "--output", out, *TINY, "--batch-size", "2", "--epochs", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "FOD_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "fod", *map(str, args)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    hist = json.loads((out / "metrics.json").read_text())["history"]
    # 8 training images (1 held out), global batch 2 x 2: two steps per epoch; one writer, one point per step
    assert len(list((out / T.EVENTS_NAME).iterdir())) == 1
    ea = _events(out)
    assert [s for s, _ in _points(ea, "step/loss")] == [1, 2, 3, 4]
    assert _points(ea, "epoch/loss") == [(2 * h["epoch"], _f32(h["loss"])) for h in hist]
    assert [float(r["loss"]) for r in _csv(out)] == [h["loss"] for h in hist]


def test_a_writer_made_in_the_same_second_comes_after_the_earlier_ones(tmp_path, monkeypatch):
    """TensorBoard reads event files in name order: second, host, process, then a counter ("...10" sorts before
    "...9"). A resume's purge marker read before what it purges would purge nothing, and be undone."""
    import tensorboard.summary.writer.event_file_writer as efw
    uids = iter([9, 10])
    monkeypatch.setattr(efw, "_global_uid", type("Uid", (), {"get": lambda self: next(uids)})())
    first = T.RunLog(tmp_path, steps_per_epoch=1, tensorboard=True)
    for step in (1, 2):
        first.train_step(step, {"loss": float(step)})
    first.close()
    second = T.RunLog(tmp_path, steps_per_epoch=1, tensorboard=True, purge_step=2)  # resumed after step 1
    second.train_step(2, {"loss": 20.0})
    second.close()
    assert _points(_events(tmp_path), "step/loss") == [(1, 1.0), (2, 20.0)]


finite_or_not = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.none())


@settings(max_examples=50)
@given(st.lists(st.dictionaries(st.sampled_from(["loss", "lr", "test/aupro", "baseline/knn/aupro"]), finite_or_not),
                max_size=5))
def test_log_csv_round_trips_every_value_exactly(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("csv") / T.CSV_NAME
    rows = [{"epoch": i + 1, **r} for i, r in enumerate(rows)]
    T.write_rows(path, rows)
    back = T.read_rows(path)
    assert len(back) == len(rows)
    for r, b in zip(rows, back):
        want = {k: v for k, v in r.items() if v is not None}
        assert set(b) == set(want)
        assert all(b[k] == want[k] or (math.isnan(b[k]) and math.isnan(want[k])) for k in want)
