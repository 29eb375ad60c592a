"""Files from others are data, never code (docs/SECURITY.md): crafted pickles at every entry point that reads a
checkpoint or weights file run nothing and give one error line; old checkpoints are refused with the conversion,
which only ``--trust`` runs, and converted ones give the same results. Tiny runs: resnet18 at 32 px."""
import json
import os
import shlex
import shutil
import warnings

import pytest
import torch

import helpers

from fod import Detector
from fod import checkpoint as C
from fod import safeformat as SF
from fod.cli import main
from fod.upgrade import upgrade, v2_digest

TINY = [*helpers.TINY, "--heatmaps", "0"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _main(*argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-init warning
        return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def root(category):
    return category(n_train=6).parent  # a dataset root holding one category, cat


@pytest.fixture(scope="module")
def run(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("sec") / "run"
    assert _main("train", "--data", root / "cat", "--output", out, *TINY, "--epochs", "1") == 0
    return out


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _malicious(kind, run, path, marker):
    """A crafted file: a raw pickle, the same payload in torch.save's zip, or a payload inside an otherwise valid
    old (v2) checkpoint whose checksum matches what the unpickled dict holds (os.system returns 0)."""
    if kind == "raw pickle":
        import pickle
        path.write_bytes(pickle.dumps({"format": "fod-checkpoint-v2", "x": Payload(marker)}))
    elif kind == "torch zip":
        torch.save({"model": {"w": torch.zeros(2)}, "x": Payload(marker)}, path)
    else:
        ck = C.load_raw(run / "checkpoint.pt")
        ck.update(format="fod-checkpoint-v2", payload=0)
        ck["sha256"] = v2_digest(ck)
        ck["payload"] = Payload(marker)
        torch.save(ck, path)
    return path


KINDS = ("raw pickle", "torch zip", "old checkpoint")


@pytest.mark.parametrize("kind", KINDS)
def test_crafted_pickles_run_nothing_at_any_entry_point(root, run, tmp_path, capsys, kind):
    marker = tmp_path / "PWNED"
    evil = _malicious(kind, run, tmp_path / "checkpoint.pt", marker)
    image = root / "cat" / "test" / "good" / "000.png"
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.copy(evil, resumed / "checkpoint.pt")
    bench = tmp_path / "bench"
    (bench / "cat").mkdir(parents=True)
    shutil.copy(evil, bench / "cat" / "checkpoint.pt")
    calls = {
        "test": ["test", "--data", root / "cat", "--checkpoint", evil, "--output", tmp_path / "t"],
        "predict": ["predict", "--checkpoint", evil, image, "--output", tmp_path / "p"],
        "export": ["export", "--checkpoint", evil, "--format", "torchscript", "--output", tmp_path / "m.pt"],
        "train": ["train", "--data", root / "cat", "--output", resumed, *TINY, "--epochs", "2", "--resume"],
        "benchmark": ["benchmark", "--data", root, "--categories", "cat", "--output", bench, *TINY, "--epochs", "1"],
    }
    weights = tmp_path / "weights.pth"
    shutil.copy(evil, weights)
    calls["train --weights"] = ["train", "--data", root / "cat", "--output", tmp_path / "w", *TINY[:4],
                                "--image-size", "32", "--weights", weights]
    for name, argv in calls.items():
        assert _main(*argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        command = name.split()[0]
        assert len(err) >= 1 and err[-1].startswith(f"fod {command}: error: "), (name, err)
        assert "Traceback" not in "\n".join(err)
        assert "upgrade" in err[-1] or "pickle" in err[-1], (name, err[-1])
        assert not marker.exists(), f"{name}: the payload ran"
    with pytest.raises(C.CheckpointError, match="pickle"):
        Detector.load(evil)
    assert not marker.exists()
    # the conversion refuses without --trust (and runs nothing)
    assert _main("checkpoint", "upgrade", evil, tmp_path / "new.pt") == 2
    assert "pass --trust only if you trust" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "new.pt").exists()


def _edit(ck, what):
    """One edit of a checkpoint's parsed data that a file with a valid checksum, written by other code, can carry."""
    level = next(iter(ck["models"]))
    edits = {
        "config not a table": lambda: ck.update(config=[1, 2]),
        "config value out of range": lambda: ck["config"].update(image_size=-5),
        "config value of another type": lambda: ck["config"].update(n_heads="2"),
        "memory not tensors": lambda: ck.update(memory="x"),
        "memory of another shape": lambda: ck["memory"].__setitem__(0, torch.zeros(3, 3)),
        "memory missing a level": lambda: ck["memory"].pop(),
        "model tensor of another shape": lambda: ck["models"].__setitem__(level, torch.zeros(1)),
        "grids not pairs": lambda: ck.update(grids=[[8], [4]]),
        "backbone without weights": lambda: ck["backbone"].update(state_dict=None),
        "preprocess std zero": lambda: ck["preprocess"].update(std=[0.0, 1.0, 1.0]),
        "history not records": lambda: ck.update(history=[1, 2]),
        "epoch negative": lambda: ck.update(epoch=-1),
    }
    edits[what]()
    return ck


EDITS = ("config not a table", "config value out of range", "config value of another type", "memory not tensors",
         "memory of another shape", "memory missing a level", "model tensor of another shape", "grids not pairs",
         "backbone without weights", "preprocess std zero", "history not records", "epoch negative")


@pytest.mark.parametrize("what", EDITS)
def test_a_checkpoint_with_a_valid_checksum_but_foreign_content_is_one_line_at_every_entry_point(
        root, run, tmp_path, capsys, what):
    """Parsed as data, a file of the current format can still hold what fod never writes: each entry point
    refuses it with one line naming the file before any long work (no traceback, no results written)."""
    ck = C.load_raw(run / "checkpoint.pt", resume=True)
    ck = _edit({k: v for k, v in ck.items() if k not in ("format", "sha256")}, what)
    bad = tmp_path / "checkpoint.pt"
    C.write(ck, bad)
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.copy(bad, resumed / "checkpoint.pt")
    image = root / "cat" / "test" / "good" / "000.png"
    calls = {
        "test": ["test", "--data", root / "cat", "--checkpoint", bad, "--output", tmp_path / "t"],
        "predict": ["predict", "--checkpoint", bad, image, "--output", tmp_path / "p"],
        "export": ["export", "--checkpoint", bad, "--format", "torchscript", "--output", tmp_path / "m.pt"],
        "train": ["train", "--data", root / "cat", "--output", resumed, *TINY, "--epochs", "2", "--resume"],
    }
    for name, argv in calls.items():
        assert _main(*argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith(f"fod {name}: error: ") and str(bad.name) in err[-1], (name, err)
        assert "Traceback" not in "\n".join(err)
    assert not any((tmp_path / n).exists() for n in ("t", "p", "m.pt"))
    with pytest.raises(C.CheckpointError, match="checkpoint.pt"):
        Detector.load(bad)


def _as_v2(run, path):
    ck = C.load_raw(run / "checkpoint.pt")
    ck["format"] = "fod-checkpoint-v2"
    ck["sha256"] = v2_digest(ck)
    torch.save(ck, path)
    return path


def test_old_checkpoints_are_refused_then_converted_give_the_same_results(root, run, tmp_path, capsys):
    old = _as_v2(run, tmp_path / "old.pt")
    image = root / "cat" / "test" / "defect" / "000.png"
    image = image if image.exists() else next((root / "cat" / "test").glob("*/000.png"))
    assert _main("predict", "--checkpoint", old, image, "--output", tmp_path / "p0") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"fod predict: error: checkpoint {old} is in the pickle format of an earlier fod version, which "
                   f"can run code when read, and is not loaded; if you trust where it came from, convert it once: "
                   f"fod checkpoint upgrade {old} NEW.pt --trust")
    new = tmp_path / "new.pt"
    assert _main("checkpoint", "upgrade", old, new, "--trust") == 0
    a, b = C.load_raw(run / "checkpoint.pt"), C.load_raw(new)
    assert a["sha256"] == b["sha256"] and new.read_bytes() == (run / "checkpoint.pt").read_bytes()  # same values
    assert _main("checkpoint", "upgrade", old, new, "--trust") == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    for ck, out in ((run / "checkpoint.pt", tmp_path / "p1"), (new, tmp_path / "p2")):
        assert _main("predict", "--checkpoint", ck, image, "--output", out, "--backend", "reference") == 0
    s1, s2 = (json.loads((tmp_path / p / "scores.json").read_text())["images"] for p in ("p1", "p2"))
    assert [(v["score"], v["anomalous"]) for v in s1.values()] == [(v["score"], v["anomalous"]) for v in s2.values()]


def test_v1_checkpoints_convert_with_bilinear_and_imagenet(run, tmp_path):
    ck = C.load_raw(run / "checkpoint.pt")
    ck["format"] = "fod-checkpoint-v1"
    for k in ("sha256", "preprocess"):
        del ck[k]
    del ck["config"]["interpolation"]
    torch.save(ck, tmp_path / "v1.pt")
    fod = C.load(upgrade(tmp_path / "v1.pt", tmp_path / "v3.pt", trust=True))
    assert fod.cfg.interpolation == "bilinear" and fod.backbone.mean == pytest.approx((0.485, 0.456, 0.406))


def test_a_damaged_v2_checkpoint_is_not_converted(run, tmp_path):
    old = _as_v2(run, tmp_path / "old.pt")
    ck = torch.load(old, weights_only=False)
    ck["epoch"] += 1  # the checksum no longer matches
    torch.save(ck, old)
    with pytest.raises(C.CheckpointError, match="does not match its SHA-256"):
        upgrade(old, tmp_path / "new.pt", trust=True)
    assert not (tmp_path / "new.pt").exists()


@pytest.mark.parametrize("value", [
    {"a": (1, 2.5, None), 3: [True, "x"], "__tuple__": 1}, {"__tensor__": "t0"}, [float("nan"), float("-inf")],
    {"state": {0: {"step": torch.tensor(2.0)}}, "arr": __import__("numpy").arange(5, dtype="<u4")}])
def test_the_container_round_trips_plain_data_exactly(value):
    back = SF.loads(SF.dumps("x-test", value), "x-test")
    assert repr(back) == repr(value)


def test_the_container_refuses_what_it_cannot_store():
    with pytest.raises(TypeError, match="Payload cannot be stored"):
        SF.dumps("x-test", {"p": Payload("nothing")})
