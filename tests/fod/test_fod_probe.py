"""Faults a probe found (issue 20): --overwrite and a user's files, SIGTERM, disk errors in words, EXIF orientation
and decompression bombs, Detector.predict over broken items. Tiny runs: resnet18 at 32 px, the reference backend."""
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import helpers

from fod import files
from fod.cli import main

TINY = [*helpers.TINY, "--heatmaps", "0"]
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _main(*argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-init warning
        return main([str(a) for a in argv])


def _one_error_line(capsys, command):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"fod {command}: error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


@pytest.fixture(scope="module")
def data(category):
    return category(n_train=6)


@pytest.fixture(scope="module")
def ck(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "run"
    assert _main("train", "--data", data, "--output", out, *TINY, "--epochs", "1") == 0
    return out / "checkpoint.pt"


def _images(data, n):
    return sorted((Path(data) / "test").glob("*/*.png"))[:n]


# ----------------------------------------------------------------------------- --overwrite and a user's files

def test_predict_overwrite_touches_only_what_fod_wrote(data, ck, tmp_path, capsys):
    out = tmp_path / "pred"
    two = _images(data, 2)
    assert _main("predict", "--checkpoint", ck, *two, "--output", out) == 0
    assert len(list((out / "heatmaps").iterdir())) == 2
    mine = {out / "heatmaps" / "my-notes.txt": b"mine", out / "masks" / "keep.png": b"also mine"}
    for p, b in mine.items():
        p.write_bytes(b)
    assert _main("predict", "--checkpoint", ck, two[0], "--output", out, "--overwrite") == 0
    for p, b in mine.items():
        assert p.read_bytes() == b, p
    manifest = set(json.loads((out / ".fod-manifest.json").read_text())["files"])
    fod_files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p not in mine
                 and p.name != ".fod-manifest.json"}
    assert manifest == fod_files and len([f for f in manifest if f.startswith("heatmaps/")]) == 1
    # --overwrite with no heat maps: fod's go, the user's stay (and so does their folder)
    assert _main("predict", "--checkpoint", ck, two[0], "--output", out, "--overwrite", "--heatmaps", "0") == 0
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["my-notes.txt"]


def test_overwrite_refuses_to_replace_a_file_fod_did_not_write(data, ck, tmp_path, capsys):
    out = tmp_path / "pred"
    img = _images(data, 1)[0]
    assert _main("predict", "--checkpoint", ck, img, "--output", out) == 0
    (out / ".fod-manifest.json").unlink()  # e.g. results of an older fod version: whose file is it?
    before = (out / "heatmaps" / f"{img.stem}.png").read_bytes()
    assert _main("predict", "--checkpoint", ck, img, "--output", out, "--overwrite") == 2
    assert "which fod did not write" in _one_error_line(capsys, "predict")
    assert (out / "heatmaps" / f"{img.stem}.png").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.startswith((".fod-tmp-", ".fod.lock"))]


def test_an_edited_manifest_cannot_point_outside_the_folder(data, ck, tmp_path):
    out = tmp_path / "pred"
    img = _images(data, 1)[0]
    assert _main("predict", "--checkpoint", ck, img, "--output", out) == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    m = json.loads((out / files.MANIFEST).read_text())
    m["files"] += ["heatmaps/../../victim.txt", "../victim.txt", str(victim)]
    (out / files.MANIFEST).write_text(json.dumps(m))
    assert _main("predict", "--checkpoint", ck, img, "--output", out, "--overwrite") == 0
    assert victim.read_text() == "keep me"


def test_predict_refuses_an_output_folder_holding_its_inputs(data, ck, tmp_path, capsys):
    out = tmp_path / "pred"
    (out / "heatmaps").mkdir(parents=True)
    img = out / "heatmaps" / "input.png"
    img.write_bytes(_images(data, 1)[0].read_bytes())
    before = img.read_bytes()
    assert _main("predict", "--checkpoint", ck, img, "--output", out, "--overwrite") == 2
    assert "holds input images of this command" in _one_error_line(capsys, "predict")
    assert img.read_bytes() == before


def test_train_and_test_overwrite_keep_a_users_file_in_heatmaps(data, tmp_path):
    for command in ("train", "test"):
        out = tmp_path / command
        argv = (["train", "--data", data, *TINY, "--epochs", "1"] if command == "train" else
                ["test", "--data", data, "--checkpoint", tmp_path / "train" / "checkpoint.pt", "--backend",
                 "reference"])
        assert _main(*argv, "--output", out, "--heatmaps", "-1") == 0
        (out / "heatmaps" / "README.txt").write_text("my notes")
        assert _main(*argv, "--output", out, "--heatmaps", "1", "--overwrite") == 0
        assert (out / "heatmaps" / "README.txt").read_text() == "my notes", command
        assert len(list((out / "heatmaps").glob("*.png"))) == 1, command


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.mark.parametrize("command", ["train", "test"])
@pytest.mark.parametrize("mine", ["log.csv", "tensorboard/events.out.tfevents.1700000000.host.1.0", "tensorboard"])
def test_a_users_log_or_a_file_where_a_folder_goes_is_refused_before_any_work(data, ck, tmp_path, capsys, command,
                                                                             mine):
    """A review found: a user's log.csv replaced without --overwrite, a user's event file claimed as fod's (and
    removed by the next --overwrite), and a file named tensorboard failing only after the whole evaluation."""
    out = tmp_path / "out"
    (out / mine).parent.mkdir(parents=True, exist_ok=True)
    (out / mine).write_text("mine")
    before = _snapshot(out)
    argv = (["train", "--data", data, "--output", out, *TINY, "--epochs", "1"] if command == "train" else
            ["test", "--data", data, "--checkpoint", ck, "--output", out, "--heatmaps", "0"])
    assert _main(*argv) == 2
    assert Path(mine).parts[0] in _one_error_line(capsys, command)
    assert _snapshot(out) == before and sorted(p.name for p in out.iterdir()) == [Path(mine).parts[0]]


def test_overwrite_after_a_killed_run_removes_its_events(data, tmp_path, monkeypatch):
    """The event files of a run killed before its first commit are fod's (the manifest names the folder from the
    start): a later --overwrite replaces them with its own instead of leaving two runs' curves."""
    out = tmp_path / "run"
    assert _main("train", "--data", data, "--output", out, *TINY, "--epochs", "1") == 0
    events = sorted((out / "tensorboard").glob(files.EVENTS_GLOB))
    (out / files.MANIFEST).unlink()  # as a run killed before its commit left it, but with its claim below
    files.OutputFolder(out, "train").write_in_place({"checkpoint.pt", "config.toml", *files.LOGS})
    (out / "checkpoint.pt").unlink()
    (out / "metrics.json").unlink()
    assert _main("train", "--data", data, "--output", out, *TINY, "--epochs", "1", "--overwrite") == 0
    after = sorted((out / "tensorboard").glob(files.EVENTS_GLOB))
    assert len(after) == 1 and after[0] not in events


def test_export_never_replaces_its_checkpoint_or_a_runs_result(ck, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ck.parent, run)
    before = _snapshot(run)
    assert _main("export", "--checkpoint", run / "checkpoint.pt", "--format", "torchscript", "--output",
                 run / "checkpoint.pt", "--overwrite") == 2
    assert "would replace the checkpoint it exports" in _one_error_line(capsys, "export")
    assert _main("export", "--checkpoint", run / "checkpoint.pt", "--format", "torchscript", "--output",
                 run / "metrics.json", "--overwrite") == 2
    assert "is a result of the fod run" in _one_error_line(capsys, "export")
    assert _snapshot(run) == before


def test_predict_refuses_a_test_results_folder(data, ck, tmp_path, capsys):
    out = tmp_path / "t"
    assert _main("test", "--data", data, "--checkpoint", ck, "--output", out, "--heatmaps", "0") == 0
    before = _snapshot(out)
    assert _main("predict", "--checkpoint", ck, *_images(data, 1), "--output", out) == 2
    assert "metrics.json" in _one_error_line(capsys, "predict")
    assert _snapshot(out) == before


def test_demo_checks_its_predict_folder_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "predict").write_text("mine")
    assert _main("demo", "--output", out, "--overwrite") == 2
    assert "predict" in _one_error_line(capsys, "demo")
    assert sorted(p.name for p in out.iterdir()) == ["predict"]


# ----------------------------------------------------------------------------- SIGTERM

def _leftovers(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.startswith((".fod-tmp-", ".fod.lock")) or ".tmp" in p.name]


def _terminate_when(argv, ready, timeout=240):
    """Start ``python -m fod ARGV``, send SIGTERM once ``ready()``; its (exit code, stderr lines)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FOD_THREADS": "1", "TQDM_DISABLE": "1"}
    p = subprocess.Popen([sys.executable, "-m", "fod", *map(str, argv)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not ready() and p.poll() is None and time.monotonic() - t0 < timeout:
        time.sleep(0.05)
    time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    return p.returncode, [line for line in err.strip().splitlines() if line.strip()]


def test_sigterm_ends_train_like_sigint_with_the_epoch_and_resume(data, tmp_path):
    from fod import checkpoint as C
    out = tmp_path / "run"
    rc, err = _terminate_when(["train", "--data", data, "--output", out, *TINY, "--epochs", "100000"],
                              lambda: (out / "checkpoint.pt").exists())
    assert rc == 128 + signal.SIGTERM, err
    epoch = C.load_raw(out / "checkpoint.pt", resume=True)["epoch"]  # the last good checkpoint is whole
    assert err[-1] == (f"fod train: interrupted (SIGTERM) after epoch {epoch}; run the same command with --resume "
                       "to continue"), err
    assert not _leftovers(out)


def test_sigterm_ends_benchmark_cleanly(data, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(data, root / "cat")
    out = tmp_path / "bench"
    rc, err = _terminate_when(["benchmark", "--data", root, "--categories", "cat", "--output", out, *TINY,
                               "--epochs", "100000"], lambda: (out / "cat" / "checkpoint.pt").exists())
    assert rc == 128 + signal.SIGTERM, err
    assert err[-1].startswith("fod benchmark: interrupted (SIGTERM); run the same command to continue"), err
    assert not _leftovers(out / "cat")


# ----------------------------------------------------------------------------- disk errors

class _FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails as a full disk does (numpy's short write has no errno)."""

    def __init__(self, f, room=64, short=False):
        self.f, self.n, self.room, self.short = f, 0, room, short

    def writable(self):
        return True

    def write(self, b):
        self.n += len(b)
        if self.n > self.room:
            if self.short:
                raise OSError(f"{len(b)} requested and {self.room} written")
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(b)

    def close(self):
        self.f.close()
        super().close()


def _fill_disk_at(monkeypatch, predicate, **kw):
    real = files.open_for_write

    def opener(path):
        f = real(path)
        return _FullDisk(f, **kw) if predicate(Path(path)) else f
    monkeypatch.setattr(files, "open_for_write", opener)
    for mod in ("fod.export", "fod.commands"):  # the modules that imported it by name
        monkeypatch.setattr(f"{mod}.open_for_write", opener)


@pytest.mark.parametrize("which", ["model", "sidecar"])
def test_a_full_disk_during_torchscript_export_is_one_line_and_leaves_nothing(ck, tmp_path, monkeypatch, capsys,
                                                                              which):
    out = tmp_path / "exp"
    out.mkdir()
    _fill_disk_at(monkeypatch, lambda p: (".json" in p.name) == (which == "sidecar"))
    assert _main("export", "--checkpoint", ck, "--format", "torchscript", "--output", out / "m.pt") == 2
    err = _one_error_line(capsys, "export")
    named = out / ("m.pt.json" if which == "sidecar" else "m.pt")
    assert err == f"fod export: error: cannot write {named}: No space left on device (ENOSPC)", err
    assert list(out.iterdir()) == []


def test_a_short_write_without_errno_is_named_as_a_full_disk(data, ck, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pred"
    _fill_disk_at(monkeypatch, lambda p: p.suffix == ".npy", short=True)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 992))
    assert _main("predict", "--checkpoint", ck, *_images(data, 1), "--output", out) == 2
    err = _one_error_line(capsys, "predict")
    assert f"cannot write {out}/.maps/0.npy: No space left on device (" in err and "(ENOSPC)" in err, err
    assert not out.exists()


def test_a_full_disk_at_the_lock_file_leaves_nothing(data, ck, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pred"

    def pwrite(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.os, "pwrite", pwrite)
    assert _main("predict", "--checkpoint", ck, *_images(data, 1), "--output", out) == 2
    assert _one_error_line(capsys, "predict") == (f"fod predict: error: cannot write {out}/.fod.lock: No space left "
                                                  "on device (ENOSPC)")
    assert not out.exists()


# ----------------------------------------------------------------------------- EXIF orientation, decompression bombs

def test_exif_orientation_is_applied_to_scores_heat_maps_and_masks(data, ck, tmp_path):
    """A photo stored sideways with an EXIF orientation gives exactly the results of the upright image."""
    from fod.data import image_size_of
    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 256, (48, 32, 3), dtype=np.uint8))  # 32 wide, 48 tall
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": the stored pixels are the upright ones turned back
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png", exif=exif)
    assert image_size_of(tmp_path / "sideways.png") == (32, 48)
    out = tmp_path / "pred"
    assert _main("predict", "--checkpoint", ck, tmp_path / "upright.png", tmp_path / "sideways.png",
                 "--output", out) == 0
    res = json.loads((out / "scores.json").read_text())["images"]
    a, b = res[str(tmp_path / "upright.png")], res[str(tmp_path / "sideways.png")]
    assert a["score"] == b["score"]
    for key in ("heatmap", "mask"):
        assert Path(a[key]).read_bytes() == Path(b[key]).read_bytes(), key


def test_max_pixels_is_one_fod_line_and_no_pillow_warning(data, ck, tmp_path, monkeypatch, capsys, recwarn):
    img = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(img)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # the default limit: Pillow's
    assert _main("predict", "--checkpoint", ck, img, "--output", tmp_path / "p") == 2
    assert _one_error_line(capsys, "predict") == (f"fod predict: error: image {img} has 100 x 100 = 10000 pixels, "
                                                  "more than the limit of 5000 (a decompression bomb?); if you trust "
                                                  "it, raise --max-pixels")
    assert _main("predict", "--checkpoint", ck, img, "--output", tmp_path / "p", "--max-pixels", "10000") == 0
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert _main("predict", "--checkpoint", ck, img, "--output", tmp_path / "q", "--max-pixels", "9999") == 2
    assert "more than the limit of 9999" in _one_error_line(capsys, "predict")


# ----------------------------------------------------------------------------- Detector.predict over broken items

@pytest.mark.parametrize("workers", [0, 1])
def test_predict_with_a_broken_image_keeps_the_valid_results(data, ck, tmp_path, workers):
    from fod import Detector
    det = Detector.load(ck, batch_size=4, num_workers=workers)
    good = [str(p) for p in _images(data, 3)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    items = [good[0], str(broken), good[1], good[2]]  # one batch of 4
    alone = {g: det.predict_one(g).score for g in good}
    got = []
    with pytest.raises(ValueError, match=f"cannot read image {broken}"):
        for p in det.predict(items):
            got.append(p)
    assert [(p.source, p.score) for p in got] == [(good[0], pytest.approx(alone[good[0]], rel=1e-5))]  # before it
    with pytest.warns(UserWarning, match=f"fod: skipped {broken}: cannot read image"):
        got = list(det.predict(items, errors="skip"))
    assert [(p.source, p.score) for p in got] == [(g, pytest.approx(alone[g], rel=1e-5)) for g in good]
    assert [s for s, _ in det.skipped] == [str(broken)]
    with pytest.raises(ValueError, match='errors must be "raise" or "skip"'):
        det.predict(items, errors="ignore")
