"""Export a trained model to ONNX or TorchScript, to run where neither ``fod`` nor ``fod_kernels`` is installed.

``fod export --checkpoint CK --format onnx|torchscript --output FILE`` writes FILE and the sidecar FILE.json.

The exported model takes ``images``, a float32 batch (N, 3, S, S) already resized, centre-cropped and
normalised (the sidecar's ``image_size``, ``resize``, ``interpolation`` (PIL's filter name), ``mean``,
``std``: resize the shorter side to ``resize`` with that filter keeping the aspect ratio, cut out the centre
S x S, divide 8-bit pixels by 255, subtract ``mean`` and divide by ``std`` per RGB channel), and returns
``anomaly_maps`` (N, S, S) float32 and ``image_scores`` (N,) float32: the max of each map after a Gaussian
filter with sigma 4, computed as ``scipy.ndimage.gaussian_filter``'s default (mode "reflect", truncate
4.0: a 33-tap kernel) by a fixed separable convolution over index-gathered reflect padding built for the
static S. Decide with the sidecar's thresholds: an image is anomalous iff its score > ``image_threshold``,
a pixel iff its map value > ``pixel_threshold`` (both null for a checkpoint without calibration); the
normalised score is ``1 / (1 + exp(-(score - center) / width))`` with the sidecar's ``normalization``.

The I2Correlation layers are exported in their ``reference`` formulation (plain PyTorch ops: the fused
kernels are custom ops that neither exporter knows), on the CPU in float32; the batch size N is dynamic,
S is fixed. ONNX: the torch.export-based exporter (``torch.onnx.export(dynamo=True)``, which needs the
``onnx`` and ``onnxscript`` packages), opset 18 by default (onnxruntime 1.14 and newer), weights inside the
one file. TorchScript: ``torch.jit.trace`` (``torch.jit.load`` reads it; no Python code of this package is
needed). After writing, the file is loaded back (onnxruntime for ONNX, if installed) and checked against the
eager model on a random batch; the relative errors (max |exported - eager| / max |eager|, per output) are
recorded in the sidecar under ``verified``.
"""
from __future__ import annotations

import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import calibration_of
from .checkpoint import load as load_checkpoint
from .files import MANIFEST, PRODUCTS, check_writable, open_for_write, tmp_name, write_temporary, writing
from .version import __version__

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 18  # the lowest opset of torch's torch.export-based ONNX exporter
EXPORT_FORMAT = "fod-export-v1"
SIGMA, TRUNCATE = 4.0, 4.0
IMAGE_SCORE = ("max of the anomaly map after a Gaussian filter with sigma 4 (scipy.ndimage.gaussian_filter: mode "
               "'reflect', truncate 4.0)")


def gaussian_kernel(sigma: float = SIGMA, truncate: float = TRUNCATE) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian weights: radius int(truncate * sigma + 0.5), exp(-x^2 / (2 sigma^2)), summing
    to 1 (float64)."""
    r = int(truncate * float(sigma) + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * x * x / (sigma * sigma))
    return w / w.sum()


def reflect_indices(n: int, r: int) -> np.ndarray:
    """Indices of [-r, n + r) into range(n) under scipy's "reflect" (d c b a | a b c d | d c b a), repeated for
    pads longer than n."""
    i = np.mod(np.arange(-r, n + r), 2 * n)
    return np.where(i >= n, 2 * n - 1 - i, i).astype(np.int64)


class GaussianFilter2d(nn.Module):
    """scipy.ndimage.gaussian_filter(x, sigma, mode="reflect", truncate) over the last two axes of (N, H, W), for
    fixed H and W: gather the reflect padding, then a separable convolution (rows, then columns)."""

    def __init__(self, h: int, w: int, sigma: float = SIGMA, truncate: float = TRUNCATE, dtype=torch.float32):
        super().__init__()
        k = torch.from_numpy(gaussian_kernel(sigma, truncate)).to(dtype)
        r = (k.numel() - 1) // 2
        self.register_buffer("k_rows", k.view(1, 1, -1, 1).clone())
        self.register_buffer("k_cols", k.view(1, 1, 1, -1).clone())
        self.register_buffer("i_rows", torch.from_numpy(reflect_indices(h, r)))
        self.register_buffer("i_cols", torch.from_numpy(reflect_indices(w, r)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)
        x = F.conv2d(x.index_select(2, self.i_rows), self.k_rows)
        x = F.conv2d(x.index_select(3, self.i_cols), self.k_cols)
        return x[:, 0]


class ExportedFOD(nn.Module):
    """images (N, 3, S, S) normalised -> (anomaly maps (N, S, S), image scores (N,))."""

    def __init__(self, fod):
        super().__init__()
        s = fod.cfg.image_size
        self.fod = fod
        self.blur = GaussianFilter2d(s, s)

    def forward(self, images: torch.Tensor):
        maps = self.fod.anomaly_maps(images)
        return maps, self.blur(maps).amax(dim=(1, 2))


def exportable(checkpoint) -> ExportedFOD:
    """The checkpoint's model as ExportedFOD: CPU, float32, eval mode, the reference kernel formulation."""
    fod = load_checkpoint(checkpoint, "cpu", "reference")
    fod.set_backend("reference")
    for m in fod.models.modules():  # value scans are skipped while tracing anyway; the eager check needs none
        if hasattr(m, "check_values"):
            m.check_values = False
    return ExportedFOD(fod).eval()


def _needs(*mods) -> None:
    import importlib.util
    missing = [m for m in mods if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"fod export --format onnx needs the Python package(s) {', '.join(missing)} (torch's ONNX "
                           "exporter uses them): pip install onnx onnxscript (the 'export' extra of this package, "
                           "which also installs onnxruntime to check the file)")


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _write_onnx(model: ExportedFOD, example: torch.Tensor, path: Path, opset: int):
    _needs("onnx", "onnxscript")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=["images"],
                          output_names=["anomaly_maps", "image_scores"], opset_version=opset, dynamo=True,
                          external_data=False, verbose=False,
                          dynamic_shapes={"images": {0: torch.export.Dim("N", min=1, max=65536)}})


def _write_torchscript(model: ExportedFOD, example: torch.Tensor, path: Path):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notice and tracer warnings
        traced = torch.jit.trace(model, (example,), check_trace=False)
    buf = io.BytesIO()  # in memory first: torch.jit.save's C++ file writer aborts the process on a full disk
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save's deprecation notice
        torch.jit.save(traced, buf)
    with open_for_write(path) as f:  # the caller turns an OSError into a WriteError naming the file
        f.write(buf.getbuffer())
        f.flush()
        os.fsync(f.fileno())


def run_exported(path, fmt: str, images: np.ndarray):
    """(maps, scores) of an exported file on a float32 batch: onnxruntime (CPU) or torch.jit.load."""
    if fmt == "onnx":
        import onnxruntime as ort
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        maps, scores = sess.run(["anomaly_maps", "image_scores"], {"images": images})
        return maps, scores
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        m = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        maps, scores = m(torch.from_numpy(images))
    return maps.numpy(), scores.numpy()


def sidecar(model: ExportedFOD, fmt: str, file: Path, checkpoint, opset: Optional[int]) -> dict:
    fod = model.fod
    pre, ck = fod.preprocess(), fod.checkpoint
    cal = calibration_of(ck)
    s = pre.image_size
    return {
        "format": EXPORT_FORMAT, "model_file": file.name, "model_format": fmt,
        **({"onnx_opset": opset} if fmt == "onnx" else {}),
        "input": {"name": "images", "shape": ["N", 3, s, s], "dtype": "float32",
                  "layout": "NCHW, RGB, resized, centre-cropped and normalised as below"},
        "outputs": {"anomaly_maps": {"shape": ["N", s, s], "dtype": "float32"},
                    "image_scores": {"shape": ["N"], "dtype": "float32", "definition": IMAGE_SCORE}},
        "image_size": s, "resize": pre.resize, "interpolation": pre.interpolation, "crop": "centre",
        "pixel_range": "8-bit values / 255 (0..1) before normalisation; grey images repeated to 3 channels",
        "mean": list(pre.mean), "std": list(pre.std), "preprocess": pre.describe(),
        "image_threshold": cal["image_threshold"] if cal else None,
        "pixel_threshold": cal["pixel_threshold"] if cal else None,
        "rule": "anomalous iff score > threshold (image: image_scores; pixel: anomaly_maps)",
        "normalization": cal["normalization"] if cal else None,
        "calibration": None if not cal else {k: cal[k] for k in ("source", "fpr_target", "image_method",
                                                                  "pixel_method", "normal_image_scores")},
        "score": fod.score_description, "image_score": IMAGE_SCORE,
        "backbone": fod.backbone.name, "levels": list(fod.backbone.levels), "weights": fod.backbone.weights_source,
        "kernel_formulation": "reference (plain PyTorch ops; the fused I2Correlation kernels are not exported)",
        "fod_version": __version__, "torch_version": torch.__version__,
        "checkpoint": str(checkpoint), "checkpoint_sha256": ck.get("sha256"),
    }


def export(checkpoint, fmt: str, output, *, opset: int = ONNX_OPSET, overwrite: bool = False, verify: bool = True,
           log=None) -> dict:
    """Write the exported model to ``output`` and its sidecar to ``output``.json; returns the sidecar."""
    from .report import say
    log = log or say
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "onnx":
        if isinstance(opset, bool) or not isinstance(opset, int) or opset < ONNX_OPSET:
            raise ValueError(f"--opset must be an integer >= {ONNX_OPSET} (the lowest that torch's ONNX exporter "
                             f"writes), got {opset!r}")
        _needs("onnx", "onnxscript")
    if not str(output).strip():
        raise ValueError("--output is empty")
    out = Path(output)
    side = out.with_name(out.name + ".json")
    if out.is_dir():
        raise IsADirectoryError(f"--output {out} is a folder; give the file to write, e.g. {out}/model.{fmt}")
    if any(p.exists() and p.resolve() == Path(checkpoint).resolve() for p in (out, side)):
        raise ValueError(f"--output {out} would replace the checkpoint it exports; choose another --output")
    if out.parent.joinpath(MANIFEST).exists() and any(out.name in names for names in PRODUCTS.values()):
        raise ValueError(f"--output {out} is a result of the fod run in {out.parent}; choose another file name")
    existing = [str(p) for p in (out, side) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace, or choose another "
                              "--output")
    check_writable(out.parent)
    model = exportable(checkpoint)
    s = model.fod.cfg.image_size
    example = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    with writing(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp, side_tmp = tmp_name(out), None
    try:
        log(f"fod export: tracing the model ({fmt}, reference formulation, input (N, 3, {s}, {s}))")
        try:
            with writing(out):  # a full disk: one line naming the file, the temporary file removed (finally)
                if fmt == "onnx":
                    _write_onnx(model, example, tmp, opset)
                else:
                    _write_torchscript(model, example, tmp)
        except OSError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise RuntimeError(f"exporting to {fmt} failed ({type(exc).__name__}: {first})") from exc
        info = sidecar(model, fmt, out, checkpoint, opset if fmt == "onnx" else None)
        info["verified"] = _verify(model, tmp, fmt, log) if verify else None
        # both files written before either is renamed into place: a full disk leaves neither half-done
        side_tmp = write_temporary(side, lambda f: f.write(json.dumps(info, indent=2).encode("utf-8")))
        with writing(out):
            os.replace(tmp, out)
            os.replace(side_tmp, side)
    finally:
        for t in (tmp, side_tmp):
            if t is not None and t.exists():
                t.unlink()
    log(f"fod export: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and {side}; thresholds: image "
        f"{info['image_threshold']}, pixel {info['pixel_threshold']}")
    return info


def _verify(model: ExportedFOD, path: Path, fmt: str, log) -> Optional[dict]:
    if fmt == "onnx":
        import importlib.util
        if importlib.util.find_spec("onnxruntime") is None:
            log("fod export: onnxruntime is not installed: the ONNX file was not checked against the eager model")
            return None
    s = model.fod.cfg.image_size
    x = torch.randn(3, 3, s, s, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        maps, scores = (t.numpy() for t in model(x))
    got_maps, got_scores = run_exported(path, fmt, x.numpy())
    v = {"batch": 3, "inputs": "standard normal (seed 1)", "runtime": "onnxruntime CPU" if fmt == "onnx" else
         "torch.jit.load", "maps_rel_err": _rel_err(got_maps, maps), "scores_rel_err": _rel_err(got_scores, scores)}
    if not (v["maps_rel_err"] < 1e-4 and v["scores_rel_err"] < 1e-4) or not math.isfinite(v["maps_rel_err"]):
        raise RuntimeError(f"the exported {fmt} model disagrees with the eager model: relative error "
                           f"{v['maps_rel_err']:.3g} (maps), {v['scores_rel_err']:.3g} (scores); not written")
    log(f"fod export: checked with {v['runtime']} against the eager model: relative error {v['maps_rel_err']:.2g} "
        f"(maps), {v['scores_rel_err']:.2g} (scores)")
    return v
