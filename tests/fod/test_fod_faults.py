"""Fault injection: kill -9 and resume, a full disk, concurrent runs, damaged checkpoints, a diverging run, and
the output folders (nothing lost, nothing stale, nothing half-written). Tiny runs: resnet18 at 32 px, the
reference backend, 1-2 epochs."""
import errno
import io
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import warnings

import numpy as np
import pytest
import torch

import helpers

from fod import checkpoint as C
from fod import files
from fod import safeformat as SF
from fod.cli import main
from fod.synthetic import make_dataset

TINY = [*helpers.TINY, "--heatmaps", "0"]


def _main(*argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-init warning
        return main([str(a) for a in argv])


def _train(data, out, *extra):
    return _main("train", "--data", data, "--output", out, *TINY, *extra)


# One torch thread for every run of this module: the kill test forks children, and GNU OpenMP hangs in a
# forked child that starts a parallel region; the runs it compares bit for bit must use the same count.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(category):
    return category(n_train=6)  # 6 training images with batch 4: two steps per epoch, the second short


@pytest.fixture(scope="module")
def run2(data, tmp_path_factory):
    """An uninterrupted 2-epoch run (a tuple, so that tests say run2[0] for its folder)."""
    out = tmp_path_factory.mktemp("faults") / "run2"
    assert _train(data, out, "--epochs", "2") == 0
    return (out,)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _one_error_line(capsys, command):
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"fod {command}: error: "), err
    return err


def _no_temporaries(folder):
    left = [p.name for p in folder.iterdir() if p.name.startswith((".fod-tmp-", ".fod.lock")) or ".tmp" in p.name]
    assert not left, left


# ----------------------------------------------------------------------------- kill -9, then --resume

def _child_train(argv, site, count):
    """Run fod train and SIGKILL this process at the ``count``-th event of ``site``: an optimiser step, a
    file write (half-way through the file), or the final move of the products into place."""
    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    calls = [0]

    def hit():
        calls[0] += 1
        return calls[0] == count

    if site == "step":
        step = torch.optim.Adam.step

        def stepped(self, *a, **k):
            out = step(self, *a, **k)
            if hit():
                die()
            return out
        torch.optim.Adam.step = stepped
    elif site == "write":
        real = files.open_for_write

        class Dying(io.RawIOBase):
            def __init__(self, f):
                self.f, self.n = f, 0

            def writable(self):
                return True

            def write(self, b):
                self.f.write(bytes(b)[: len(b) // 2])
                self.f.flush()
                die()

        files.open_for_write = lambda path: Dying(real(path)) if hit() else real(path)
    else:
        commit = files.OutputFolder.commit
        files.OutputFolder.commit = lambda self: die() if hit() else commit(self)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(argv)


def test_kill_9_at_random_points_then_resume_equals_an_uninterrupted_run(data, run2, tmp_path):
    ref = run2[0]
    out = tmp_path / "killed"
    rng = random.Random()
    ctx = mp.get_context("fork")
    kills = []
    for _ in range(3):
        argv = ["train", "--data", str(data), "--output", str(out), *TINY, "--epochs", "2"]
        if (out / "checkpoint.pt").exists():
            argv.append("--resume")
        site = rng.choice(["step", "step", "write", "commit"])
        count = {"step": rng.randint(1, 4), "write": rng.randint(1, 5), "commit": 1}[site]
        p = ctx.Process(target=_child_train, args=(argv, site, count))
        p.start()
        p.join()
        kills.append((site, count, p.exitcode, sorted(x.name for x in out.iterdir()) if out.exists() else None))
    resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
    assert _train(data, out, "--epochs", "2", *resume) == 0, kills
    a, b = C.load_raw(ref / "checkpoint.pt"), C.load_raw(out / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 2
    for k in a["models"]:
        assert torch.equal(a["models"][k], b["models"][k]), (k, kills)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (ref, out))
    assert [h["loss"] for h in ma["history"]] == [h["loss"] for h in mb["history"]], kills
    assert (ma["image_auroc"], ma["pixel_auroc"], ma["aupro"]) == (mb["image_auroc"], mb["pixel_auroc"], mb["aupro"])
    _no_temporaries(out)


# ----------------------------------------------------------------------------- a full disk

class _FullDisk(io.RawIOBase):
    """A file that takes a few bytes, then fails as a full disk does."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def writable(self):
        return True

    def write(self, b):
        self.n += len(b)
        if self.n > 64:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(b)

    def close(self):
        self.f.close()
        super().close()


def _fill_disk_at(monkeypatch, predicate):
    real = files.open_for_write

    def opener(path):
        f = real(path)
        return _FullDisk(f) if predicate(path) else f
    monkeypatch.setattr(files, "open_for_write", opener)


def test_out_of_space_at_the_checkpoint_write_keeps_the_previous_checkpoint(data, run2, tmp_path, monkeypatch,
                                                                              capsys):
    out = _copy(run2[0], tmp_path / "run")
    before = {p: (out / p).read_bytes() for p in ("checkpoint.pt", "metrics.json", "config.toml")}
    _fill_disk_at(monkeypatch, lambda p: p.name.startswith("checkpoint.pt"))
    assert _train(data, out, "--epochs", "3", "--resume") == 2
    err = _one_error_line(capsys, "train")
    assert f"cannot write {out / 'checkpoint.pt'}: No space left on device (ENOSPC)" in err
    assert "keeps the last good model (epoch 2" in err
    for p, b in before.items():
        assert (out / p).read_bytes() == b, p
    _no_temporaries(out)


def test_out_of_space_at_a_heat_map_write_leaves_the_previous_results_whole(run2, tmp_path, monkeypatch, capsys):
    ck, out = run2[0] / "checkpoint.pt", tmp_path / "test"
    assert _main("test", "--data", _data_of(run2), "--checkpoint", ck, "--output", out, "--backend", "reference",
                 "--heatmaps", "-1") == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert len([p for p in before if p.parts[0] == "heatmaps"]) == 5
    with monkeypatch.context() as m:
        _fill_disk_at(m, lambda p: p.suffix == ".png" or ".png.tmp" in p.name)
        assert _main("test", "--data", _data_of(run2), "--checkpoint", ck, "--output", out, "--overwrite",
                     "--backend", "reference") == 2
    err = _one_error_line(capsys, "test")
    assert f"cannot write {out / 'heatmaps'}/" in err and "No space left on device (ENOSPC)" in err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    # --overwrite without heat maps: the previous run's heat maps do not stay behind
    assert _main("test", "--data", _data_of(run2), "--checkpoint", ck, "--output", out, "--overwrite",
                 "--backend", "reference", "--heatmaps", "0") == 0
    assert not (out / "heatmaps").exists()
    assert sorted(p.name for p in out.iterdir() if p.name != files.MANIFEST) == [
        "log.csv", "metrics.json", "summary.png", "tensorboard"]


def _data_of(run2):
    return json.loads((run2[0] / "metrics.json").read_text())["config"]["data"]


# ----------------------------------------------------------------------------- concurrent runs

def _hold_lock(folder, ready, release):
    lock = files.OutputLock(folder, "fod train (test)")
    lock.acquire()
    ready.set()
    release.wait(60)


def test_concurrent_runs_into_one_folder(run2, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(out, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        argv = ("test", "--data", _data_of(run2), "--checkpoint", run2[0] / "checkpoint.pt", "--output", out,
                "--backend", "reference")
        assert _main(*argv) == 2
        err = _one_error_line(capsys, "test")
        assert f"output folder {out} is in use by another fod process (PID {holder.pid}: fod train (test)" in err
        assert not (out / "metrics.json").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock: its lock file stays, its flock goes
        holder.join()
    assert (out / files.LOCK_NAME).exists()
    assert _main(*argv) == 0  # the dead process's lock is taken over
    _no_temporaries(out)
    # within one process too
    with files.OutputFolder(out, "test", overwrite=True).open():
        with pytest.raises(files.FolderInUse, match=f"PID {os.getpid()}"):
            with files.OutputFolder(out, "test", overwrite=True).open():
                pass


# ----------------------------------------------------------------------------- damaged checkpoints

def _damage(kind, src, dst):
    raw = bytearray(src.read_bytes())
    if kind == "empty":
        raw = b""
    elif kind == "truncated":
        raw = raw[: len(raw) * 2 // 3]
    elif kind == "flipped tensor byte":
        raw[len(raw) - len(raw) // 4] ^= 0x10  # in the tensor data at the end of the safetensors payload
    elif kind == "cut first line":
        raw = raw[:40]
    elif kind == "foreign pickle":
        torch.save([1, 2, 3], dst)
        return
    elif kind == "plain state dict":
        torch.save({"conv1.weight": torch.zeros(2)}, dst)
        return
    elif kind == "text file":
        raw = b"not a checkpoint\n" * 100
    elif kind in ("wrong version", "nan weights", "missing entry"):
        ck = C.load_raw(src)
        if kind == "nan weights":
            k = next(iter(ck["models"]))
            ck["models"][k] = torch.full_like(ck["models"][k], float("nan"))
        elif kind == "missing entry":
            del ck["models"]
        # a consistent checksum: the content itself is what is wrong
        raw = SF.dumps("fod-checkpoint-v9" if kind == "wrong version" else C.CHECKPOINT_FORMAT, ck)
    dst.write_bytes(bytes(raw))


KINDS = {"empty": "is empty (0 bytes)", "truncated": "does not match its SHA-256 checksum",
         "flipped tensor byte": "does not match its SHA-256 checksum",
         "cut first line": "is damaged: its first line is cut or altered",
         "foreign pickle": "is not a FOD checkpoint (it is a pickle file",
         "plain state dict": "is not a FOD checkpoint (it is a pickle file",
         "text file": "is not a FOD checkpoint (it does not start with 'fod-checkpoint-v3 sha256=')",
         "wrong version": "has format 'fod-checkpoint-v9', which this version of fod does not read",
         "nan weights": "holds NaN or infinite weights", "missing entry": "is damaged: it lacks models"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_damaged_checkpoints_are_clear_errors(run2, tmp_path, capsys, kind):
    bad = tmp_path / "checkpoint.pt"
    _damage(kind, run2[0] / "checkpoint.pt", bad)
    out = tmp_path / "out"
    assert _main("test", "--data", _data_of(run2), "--checkpoint", bad, "--output", out) == 2
    err = _one_error_line(capsys, "test")
    assert KINDS[kind] in err and str(bad) in err, err
    assert not out.exists()
    if kind in ("flipped tensor byte", "truncated"):
        assert _main("predict", "--checkpoint", bad, _data_of(run2) + "/test/good/000.png", "--output", out) == 2
        assert KINDS[kind] in _one_error_line(capsys, "predict")
        run = _copy(run2[0], tmp_path / "run")
        shutil.copy(bad, run / "checkpoint.pt")
        assert _train(_data_of(run2), run, "--epochs", "3", "--resume") == 2
        assert KINDS[kind] in _one_error_line(capsys, "train")


def test_a_checkpoint_given_as_weights(data, run2, tmp_path, capsys):
    assert _main("train", "--data", data, "--output", tmp_path / "o", "--backbone", "resnet18", "--levels", "layer2",
                 "--image-size", "32", "--weights", run2[0] / "checkpoint.pt") == 2
    assert "is a FOD checkpoint (fod train's checkpoint.pt), not backbone weights" in _one_error_line(capsys, "train")


def test_every_byte_flip_is_refused(run2, tmp_path):
    """The checksum covers every byte: wherever a bit flips (the first line or the payload), loading fails."""
    src = run2[0] / "checkpoint.pt"
    raw = src.read_bytes()
    rng = random.Random(0)
    for pos in rng.sample(range(100), 4) + rng.sample(range(len(raw)), 12):
        bad = bytearray(raw)
        bad[pos] ^= 1 << rng.randrange(8)
        p = tmp_path / f"flip{pos}.pt"
        p.write_bytes(bytes(bad))
        with pytest.raises(C.CheckpointError):
            C.load_raw(p)


# ----------------------------------------------------------------------------- a run that diverges

def _poison(monkeypatch, at_call: int, what: str):
    """Make the ``at_call``-th training forward of a level model return a non-finite ``what``."""
    from fod import model as Mod
    real, calls = Mod.LevelModel.forward, [0]

    def forward(self, feat, memory, need_stats=(True, True)):
        out, intra, inter = real(self, feat, memory, need_stats)
        if need_stats == (True, True):
            calls[0] += 1
            if calls[0] == at_call:
                nan = float("nan")
                if what == "rec":
                    out = out * nan
                else:
                    stats = intra if what.endswith("intra") else inter
                    field = "kl_attn" if what.startswith("K") else "entropy"
                    stats[0] = stats[0]._replace(**{field: getattr(stats[0], field) * nan})
        return out, intra, inter
    monkeypatch.setattr(Mod.LevelModel, "forward", forward)


@pytest.mark.parametrize("term", ["rec", "K_intra", "K_inter", "E_intra", "E_inter"])
def test_diverging_training_names_the_term_and_keeps_the_last_good_checkpoint(data, run2, tmp_path, monkeypatch,
                                                                               capsys, term):
    out = _copy(run2[0], tmp_path / "run")
    before = (out / "checkpoint.pt").read_bytes()
    _poison(monkeypatch, 4 if term == "rec" else 1, term)  # call 4: step 2, second level
    assert _train(data, out, "--epochs", "3", "--resume") == 2
    err = _one_error_line(capsys, "train")
    step, level = ("step 2", "layer2") if term == "rec" else ("step 1", "layer1")
    assert f"training diverged at epoch 3, {step}: the first non-finite loss term is {term} = nan (level {level}" \
        in err, err
    assert "keeps the last good model (epoch 2" in err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_a_failed_overwrite_leaves_the_previous_run_whole(data, run2, tmp_path, monkeypatch, capsys):
    """It used to leave the new run's checkpoint beside the old run's metrics."""
    out = _copy(run2[0], tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _poison(monkeypatch, 5, "rec")  # epoch 2, step 1: after the new run's first checkpoint
    assert _train(data, out, "--epochs", "2", "--overwrite") == 2
    err = _one_error_line(capsys, "train")
    assert "epoch 2, step 1" in err and f"the previous results in {out} are unchanged" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    _no_temporaries(out)


def test_total_loss_overflow_with_finite_terms(data, tmp_path, capsys):
    assert _train(data, tmp_path / "o", "--epochs", "1", "--lambda2", "1e38", "--lambda1", "1e38") == 2
    err = _one_error_line(capsys, "train")
    assert "training diverged at epoch 1, step 1: the total loss is" in err and "no checkpoint was written" in err
    assert not (tmp_path / "o").exists()
    (tmp_path / "mine").mkdir()  # a folder of the user's: left as it was, empty
    assert _train(data, tmp_path / "mine", "--epochs", "1", "--lambda2", "1e38", "--lambda1", "1e38") == 2
    assert list((tmp_path / "mine").iterdir()) == []


# ----------------------------------------------------------------------------- what a command may write where

def test_commands_do_not_write_into_each_others_folders(run2, tmp_path, capsys):
    run, data = run2[0], _data_of(run2)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    img = data + "/test/good/000.png"
    for overwrite in ([], ["--overwrite"]):
        assert _main("predict", "--checkpoint", run / "checkpoint.pt", img, "--output", run, *overwrite) == 2
        assert "holds a training run (checkpoint.pt)" in _one_error_line(capsys, "predict")
        assert _main("test", "--data", data, "--checkpoint", run / "checkpoint.pt", "--output", run, *overwrite) == 2
        assert "holds a training run" in _one_error_line(capsys, "test")
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # predict's products, and --overwrite
    pred, cut = tmp_path / "pred", data + "/test/cut/000.png"
    assert _main("predict", "--checkpoint", run / "checkpoint.pt", img, cut, img, "--output", pred, "--heatmaps",
                 "1") == 0
    assert sorted(p.name for p in (pred / "heatmaps").iterdir()) == ["000.png"]
    scores = json.loads((pred / "scores.json").read_text())["images"]
    assert list(scores) == [img, cut] and scores[img]["heatmap"] == str(pred / "heatmaps" / "000.png")
    assert scores[cut]["heatmap"] is None and scores[cut]["map_key"] == "000_1"
    assert sorted(np.load(pred / "maps.npz").files) == ["000", "000_1"]
    assert _main("predict", "--checkpoint", run / "checkpoint.pt", img, "--output", pred) == 2
    err = _one_error_line(capsys, "predict")
    assert "pass --overwrite" in err and "--resume" not in err
    assert _main("predict", "--checkpoint", run / "checkpoint.pt", img, "--output", pred, "--overwrite",
                 "--heatmaps", "0") == 0
    assert not (pred / "heatmaps").exists()


def test_stale_temporaries_go_and_user_files_stay(run2, tmp_path):
    out = tmp_path / "p"
    (out / ".fod-tmp-1-deadbeef" / "heatmaps").mkdir(parents=True)
    (out / "scores.json.tmp-1-deadbeef").write_text("half")
    (out / "maps.npz.tmp").write_text("half")
    (out / "notes.tmp").write_text("the user's")
    (out / "mine.txt").write_text("the user's")
    assert _main("predict", "--checkpoint", run2[0] / "checkpoint.pt", _data_of(run2) + "/test/good/000.png",
                 "--output", out) == 0
    assert sorted(p.name for p in out.iterdir() if p.name != files.MANIFEST) == [
        "heatmaps", "maps.npz", "masks", "mine.txt", "notes.tmp", "scores.json"]


def test_resume_with_fewer_epochs_than_trained_is_refused(data, run2, tmp_path, capsys):
    out = _copy(run2[0], tmp_path / "run")
    assert _train(data, out, "--epochs", "1", "--resume") == 2
    err = _one_error_line(capsys, "train")
    assert "--resume --epochs 1" in err and "already been trained for 2 epochs" in err
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2


def test_test_and_predict_apply_their_run_options(run2, tmp_path, capsys):
    run, data = run2[0], _data_of(run2)
    m = json.loads((run / "metrics.json").read_text())
    out = tmp_path / "t"
    assert _main("test", "--data", data, "--checkpoint", run / "checkpoint.pt", "--output", out, "--workers", "1",
                 "--heatmaps", "2", "--batch-size", "3", "--backend", "reference") == 0
    t = json.loads((out / "metrics.json").read_text())
    assert (t["image_auroc"], t["pixel_auroc"], t["aupro"]) == (m["image_auroc"], m["pixel_auroc"], m["aupro"])
    assert t["config"]["num_workers"] == 1 and t["config"]["batch_size"] == 3
    assert len(list((out / "heatmaps").iterdir())) == 2
    log = capsys.readouterr().err
    assert "checkpoint.pt" not in log.split("fod: results in")[-1]  # fod test lists only what it wrote
    for cmd, extra in (("test", ["--data", data]), ("predict", [data + "/test/good/000.png"])):
        assert _main(cmd, *extra, "--checkpoint", run / "checkpoint.pt", "--output", tmp_path / "x", "--amp") == 2
        assert "--amp (bf16 autocast) is for CUDA only" in _one_error_line(capsys, cmd)
        assert _main(cmd, *extra, "--checkpoint", run / "checkpoint.pt", "--output", tmp_path / "x",
                     "--batch-size", "0") == 2
        assert "--batch-size must be >= 1" in _one_error_line(capsys, cmd)
    assert not (tmp_path / "x").exists()


def test_predict_names_that_are_python_keywords_of_savez(run2, tmp_path):
    """An image called file.png crashed predict: np.savez_compressed(f, **maps) got 'file' twice."""
    src = _data_of(run2) + "/test/good/000.png"
    for name in ("file", "allow_pickle"):
        shutil.copy(src, tmp_path / f"{name}.png")
    out = tmp_path / "p"
    assert _main("predict", "--checkpoint", run2[0] / "checkpoint.pt", tmp_path / "file.png",
                 tmp_path / "allow_pickle.png", "--output", out, "--heatmaps", "0") == 0
    maps = np.load(out / "maps.npz")
    assert sorted(maps.files) == ["allow_pickle", "file"] and maps["file"].shape == (32, 32)
    np.testing.assert_array_equal(maps["file"], maps["allow_pickle"])


def test_predict_input_errors(run2, tmp_path, capsys):
    run, data = run2[0], _data_of(run2)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    for arg, needle in ((data + "/test", "is a folder, not an image file"), (tmp_path / "bad.png", "cannot read image"),
                        (tmp_path / "nope.png", "image not found")):
        assert _main("predict", "--checkpoint", run / "checkpoint.pt", arg, "--output", tmp_path / "p") == 2
        err = _one_error_line(capsys, "predict")
        assert needle in err and str(arg) in err
    assert _main("predict", "--checkpoint", run, data + "/test/good/000.png", "--output", tmp_path / "p") == 2
    assert "is a folder; give the checkpoint.pt file in it" in _one_error_line(capsys, "predict")
    assert not (tmp_path / "p").exists()


def test_the_whole_test_split_is_checked_before_training(tmp_path, capsys):
    data = make_dataset(tmp_path / "cat", size=32, n_train=2, n_test_good=1, n_test_defect=1)
    (data / "test/spot/000.png").write_bytes(b"damaged")
    assert _train(data, tmp_path / "o", "--epochs", "5") == 2
    err = _one_error_line(capsys, "train")
    assert "cannot read image" in err and "spot/000.png" in err and "epoch" not in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    for kind in ("scratch", "spot", "cut"):
        shutil.rmtree(data / "test" / kind)
    assert _train(data, tmp_path / "o", "--epochs", "5") == 2
    assert "holds only normal images" in _one_error_line(capsys, "train")
    assert not (tmp_path / "o").exists()


def test_image_size_too_small_for_the_levels(data, tmp_path, capsys):
    """16 px gave layer3 a 1x1 token grid: every map 0 and AUROC exactly 0.5, exit 0."""
    assert _main("train", "--data", data, "--output", tmp_path / "o", *TINY, "--levels", "layer2,layer3",
                 "--image-size", "16", "--epochs", "1") == 2
    err = _one_error_line(capsys, "train")
    assert "--image-size 16 is too small for resnet18 levels layer2,layer3: token grid layer3 1x1" in err
    assert "the smallest usable --image-size is 17" in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- the demo's data folder

def test_demo_overwrite_never_deletes_user_files(tmp_path, capsys):
    out = tmp_path / "demo"
    make_dataset(out / "data", size=32, n_train=2, n_test_good=1, n_test_defect=1)
    (out / "data/train/good/mine.png").write_bytes(b"the user's own image")
    (out / "data/notes.txt").write_text("keep me")
    before = {p: p.read_bytes() for p in (out / "data").rglob("*") if p.is_file()}
    tiny_demo = ["--train-images", "2", "--image-size", "32", "--epochs", "0", "--d-model", "16", "--heads", "2",
                 "--layers", "1", "--backend", "reference", "--heatmaps", "0"]
    assert _main("demo", "--output", out, "--overwrite", *tiny_demo) == 2
    err = _one_error_line(capsys, "demo")
    assert "2 file(s) that fod demo did not write (notes.txt, train/good/mine.png)" in err
    assert {p: p.read_bytes() for p in (out / "data").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == ["data"]
    # bad options are found before anything is written
    assert _main("demo", "--output", tmp_path / "d2", "--lr", "nan") == 2
    assert "--lr must be a finite number" in _one_error_line(capsys, "demo")
    assert not (tmp_path / "d2").exists()


def test_remove_dataset_removes_exactly_what_make_dataset_wrote(tmp_path):
    from fod.synthetic import MANIFEST, demo_files, remove_dataset
    root = make_dataset(tmp_path / "d", size=16, n_train=2, n_test_good=1, n_test_defect=1)
    assert len(demo_files(root)) == 2 + 1 + 3 * 2
    remove_dataset(root)
    assert not root.exists()
    root.mkdir()
    (root / "x.png").write_bytes(b"")
    with pytest.raises(FileExistsError, match=f"has no {MANIFEST}"):
        demo_files(root)
    assert np.array_equal([p.name for p in root.iterdir()], ["x.png"])


def test_resume_on_other_training_data_is_refused(data, run2, tmp_path, capsys):
    """The reference memory in the checkpoint is the old images' mean: continuing on other images was silent."""
    out = _copy(run2[0], tmp_path / "run")
    moved = tmp_path / "005.png"
    (data / "train/good/005.png").rename(moved)
    try:
        assert _train(data, out, "--epochs", "3", "--resume") == 2
        err = _one_error_line(capsys, "train")
        assert f"the training images under {data} are not those" in err and "(6 images then, 5 now" in err
    finally:
        moved.rename(data / "train/good/005.png")
