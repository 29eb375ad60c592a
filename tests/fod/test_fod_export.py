"""fod export: the Gaussian filter against scipy, the files against the eager model and `fod predict`, run in a
fresh process in which neither fod nor fod_kernels can be imported."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

import helpers

from fod import checkpoint as C
from fod import export as E
from fod import metrics as M
from fod.cli import main
from fod_kernels import available_backends

ROOT = Path(__file__).resolve().parents[2]
TINY = [*helpers.TINY, "--epochs", "1"]
NO_ORT = "onnxruntime is not installed (tools/setup.sh installs it: pip install onnxruntime onnx onnxscript)"


@settings(max_examples=40)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_gaussian_filter_equals_scipy(h, w, seed):
    """Every size, including those smaller than the 16-pixel radius (reflected more than once)."""
    x = np.random.default_rng(seed).standard_normal((2, h, w))
    got = E.GaussianFilter2d(h, w, dtype=torch.float64)(torch.from_numpy(x)).numpy()
    for g, m in zip(got, x):
        np.testing.assert_allclose(g, ndimage.gaussian_filter(m, sigma=4.0), rtol=0, atol=1e-12)


def test_gaussian_filter_helpers():
    k = E.gaussian_kernel()
    assert k.size == 33 and abs(k.sum() - 1) < 1e-15 and np.argmax(k) == 16
    assert E.reflect_indices(3, 5).tolist() == [1, 2, 2, 1, 0, 0, 1, 2, 2, 1, 0, 0, 1]  # d c b a | a b c d | ...
    maps = np.random.default_rng(0).random((3, 20, 30)).astype(np.float32)
    blur = E.GaussianFilter2d(20, 30)
    np.testing.assert_allclose(blur(torch.from_numpy(maps)).amax(dim=(1, 2)).numpy(), M.image_scores(maps),
                               rtol=1e-6)


@pytest.fixture(scope="module")
def data(category):
    return category(size=40, seed=3)  # 40 px images: resized to 32 (not only cropped)


@pytest.fixture(scope="module")
def run(data, trained):
    return trained(data, "--epochs", "1", "--val-fraction", "0.3")


@pytest.fixture(scope="module")
def predicted(data, run, tmp_path_factory):
    """fod predict with the fused CPU kernels (when built) on 5 test images: the eager model's results."""
    out = tmp_path_factory.mktemp("pred") / "pred"
    imgs = sorted(str(p) for p in (data / "test").glob("*/*.png"))[:5]
    backend = "cpu" if available_backends()["cpu"].available else "reference"
    assert main(["predict", "--checkpoint", str(run / "checkpoint.pt"), *imgs, "--output", str(out),
                 "--backend", backend]) == 0
    return imgs, json.loads((out / "scores.json").read_text()), dict(np.load(out / "maps.npz"))


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """Both formats written by fod export (ONNX only where onnxruntime, which checks it, is installed)."""
    d = tmp_path_factory.mktemp("exported")
    files = {"torchscript": str(d / "model.pt")}
    if importlib.util.find_spec("onnxruntime") is not None:
        files["onnx"] = str(d / "model.onnx")
    for fmt, path in files.items():
        assert main(["export", "--checkpoint", str(run / "checkpoint.pt"), "--format", fmt, "--output", path]) == 0
    return files


FRESH = r'''
import importlib.abc, json, sys

class Blocked(importlib.abc.MetaPathFinder):  # whatever is installed (an editable install too): not importable
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fod", "fod_kernels"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

sys.meta_path.insert(0, Blocked())
for name in ("fod", "fod_kernels"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable in the fresh process")

import numpy as np
import torch
from PIL import Image

cfg = json.load(open(sys.argv[1]))
exec(cfg["readme_preprocess"])  # docs/deployment.md's preprocess(path, meta)
out = {}
for fmt, path in cfg["files"].items():
    meta = json.load(open(path + ".json"))
    x = np.stack([preprocess(p, meta) for p in cfg["images"]]).astype(np.float32)
    out["preprocess_max_abs_err"] = float(np.abs(x - np.load(cfg["fod_inputs"])).max())
    if fmt == "onnx":
        import onnxruntime as ort
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        run = lambda b: sess.run(["anomaly_maps", "image_scores"], {"images": b})
    else:
        model = torch.jit.load(path)
        run = lambda b: [t.numpy() for t in model(torch.from_numpy(b))]
    with torch.no_grad():
        maps, scores = run(x)
        one = run(x[:1])
    out[fmt] = {"maps": maps.tolist(), "scores": scores.tolist(), "one_maps": one[0].tolist(),
                "one_scores": one[1].tolist(), "threshold": meta["image_threshold"]}
out["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("fod", "fod_kernels"))
json.dump(out, open(sys.argv[2], "w"))
'''


def _readme_preprocess() -> str:
    text = (ROOT / "docs" / "deployment.md").read_text()
    block = re.search(r"```python\n(import json\n.*?)```", text[text.index("## Export"):], re.S).group(1)
    return block[block.index("def preprocess"):block.index("\n\n\nmeta =")]


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_exported_models_run_without_fod_and_reproduce_predict(run, predicted, exported, tmp_path):
    imgs, scores_json, maps = predicted
    files = exported
    from fod.api import Detector
    det = Detector.load(run / "checkpoint.pt")
    np.save(tmp_path / "inputs.npy", torch.stack([det.preprocess.image(p) for p in imgs]).numpy())
    cfg = {"files": files, "images": imgs, "fod_inputs": str(tmp_path / "inputs.npy"),
           "readme_preprocess": _readme_preprocess()}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "fresh.py").write_text(FRESH)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-I", str(tmp_path / "fresh.py"), str(tmp_path / "cfg.json"),
                        str(tmp_path / "out.json")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["modules"] == []
    assert out["preprocess_max_abs_err"] <= 1e-6  # docs/deployment.md's preprocessing is fod's
    want_maps = np.stack([maps[scores_json["images"][p]["map_key"]] for p in imgs])
    want_scores = np.array([scores_json["images"][p]["score"] for p in imgs])
    want_anom = [scores_json["images"][p]["anomalous"] for p in imgs]
    for fmt in files:
        o = out[fmt]
        assert _rel(o["maps"], want_maps) < 1e-4, fmt
        assert np.max(np.abs(np.array(o["scores"]) / want_scores - 1)) < 1e-4, fmt  # every score, relatively
        assert _rel(o["one_maps"], want_maps[:1]) < 1e-4 and np.allclose(o["one_scores"], o["scores"][:1])
        assert o["threshold"] == scores_json["calibration"]["image_threshold"]
        assert [s > o["threshold"] for s in o["scores"]] == want_anom, fmt
    if "onnx" not in files:
        pytest.skip(NO_ORT + ": the TorchScript file was checked, the ONNX file was not written")


def test_onnx_graph_is_standard_opset_18(exported):
    if "onnx" not in exported:
        pytest.skip(NO_ORT)
    import onnx
    path = Path(exported["onnx"])
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert {(o.domain or "ai.onnx"): o.version for o in model.opset_import}.get("ai.onnx") == 18
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # no custom (kernel) op
    assert not list(path.parent.glob("*.data"))  # the weights are inside the one file
    side = json.loads(Path(str(path) + ".json").read_text())
    assert side["onnx_opset"] == 18 and side["verified"]["maps_rel_err"] < 1e-4
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["anomaly_maps", "image_scores"]


def test_sidecar_and_command_errors(run, data, tmp_path, capsys):
    path = tmp_path / "m.pt"
    assert main(["export", "--checkpoint", str(run / "checkpoint.pt"), "--format", "torchscript",
                 "--output", str(path)]) == 0
    side = json.loads((tmp_path / "m.pt.json").read_text())
    ck = C.load_raw(run / "checkpoint.pt")
    for k in ("image_size", "resize", "interpolation", "mean", "std", "image_threshold", "pixel_threshold",
              "fod_version", "backbone", "score", "image_score", "normalization", "checkpoint_sha256"):
        assert k in side, k
    assert (side["image_size"], side["resize"], side["interpolation"]) == (32, 32, "lanczos")
    assert side["image_threshold"] == ck["calibration"]["image_threshold"]
    assert side["pixel_threshold"] == ck["calibration"]["pixel_threshold"]
    assert side["checkpoint_sha256"] == ck["sha256"] and side["model_format"] == "torchscript"
    capsys.readouterr()

    def err(*args):
        assert main(["export", "--checkpoint", str(run / "checkpoint.pt"), *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fod export: error: ")
        return lines[0]

    before = path.read_bytes()
    assert "already exist" in err("--format", "torchscript", "--output", str(path))
    assert path.read_bytes() == before
    assert "is a folder" in err("--format", "torchscript", "--output", str(tmp_path))
    if importlib.util.find_spec("onnxscript") is not None:
        assert "--opset must be an integer >= 18" in err("--format", "onnx", "--output", str(tmp_path / "x.onnx"),
                                                         "--opset", "17")
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--format", "torchscript", "--output",
                 str(tmp_path / "y.pt")]) == 2
    assert not (tmp_path / "y.pt").exists() and not (tmp_path / "y.pt.json").exists()
    with pytest.raises(RuntimeError, match="pip install onnx onnxscript"):
        E._needs("no_such_module_for_fod_tests")

    # a checkpoint without thresholds: null in the sidecar
    run0 = tmp_path / "run0"
    with pytest.warns(UserWarning):
        assert main(["train", "--data", str(data), "--output", str(run0), *TINY, "--val-fraction", "0"]) == 0
    assert main(["export", "--checkpoint", str(run0 / "checkpoint.pt"), "--format", "torchscript", "--output",
                 str(tmp_path / "z.pt")]) == 0
    side0 = json.loads((tmp_path / "z.pt.json").read_text())
    assert side0["image_threshold"] is None and side0["pixel_threshold"] is None and side0["normalization"] is None
