"""CPU latency of the exported model (onnxruntime, TorchScript) next to the eager model, per image at batch 1 and 8.

    python benchmarks/export_latency.py --checkpoint RUN/checkpoint.pt --name export_latency_demo

Exports the checkpoint to both formats (fod export, into a temporary folder unless --keep DIR), then times on
the same random preprocessed batches (N, 3, S, S) the computation every variant does: the anomaly maps and the
image scores (the sigma-4 Gaussian filter and max, as torch ops):

- eager (cpu kernels): fod's model with the fused C++ CPU I2Correlation kernels (what fod predict runs);
- eager (reference): the same model with the reference formulation (what is exported);
- torchscript: the exported file through torch.jit.load;
- onnxruntime: the exported file through onnxruntime's CPU execution provider.

Each number is the median over --repeats timed calls (after --warmup untimed ones; the variants' calls
interleaved) of one call's wall time divided by the batch size; all variants use --threads threads.
Writes benchmarks/results/NAME.json and NAME.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fod import export as E  # noqa: E402
from fod_kernels import available_backends  # noqa: E402
from machine import cpu_model  # noqa: E402  (benchmarks/, the script's folder)


def timed(fn, x, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn(x)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--name", default="export_latency", help="results file name under benchmarks/results/")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", default=None, metavar="DIR", help="write the exported files here (default: temporary)")
    ap.add_argument("--note", default="", help="a line for the report (e.g. how the checkpoint was made)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fod-export-latency-"))
    folder.mkdir(parents=True, exist_ok=True)
    files = {"onnx": folder / "model.onnx", "torchscript": folder / "model.pt"}
    for fmt, path in files.items():
        E.export(args.checkpoint, fmt, path, overwrite=True)

    model = E.exportable(args.checkpoint)  # reference formulation
    s = model.fod.cfg.image_size
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    sess = ort.InferenceSession(str(files["onnx"]), opts, providers=["CPUExecutionProvider"])
    ts = torch.jit.load(str(files["torchscript"]))

    def eager(backend):
        def run(x):
            model.fod.set_backend(backend)
            with torch.no_grad():
                return model(x)
        return run

    variants = {}
    if available_backends()["cpu"].available:
        variants["eager (cpu kernels)"] = eager("cpu")
    variants["eager (reference)"] = eager("reference")

    def run_ts(x):
        with torch.no_grad():
            return ts(x)
    variants["torchscript"] = run_ts
    variants["onnxruntime"] = lambda x: sess.run(None, {"images": x.numpy()})

    rows = []
    for b in [int(v) for v in args.batches.split(",")]:
        x = torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(b))
        times = {name: [] for name in variants}
        for name, fn in variants.items():
            timed(fn, x, args.warmup, 0)
        for _ in range(args.repeats):  # interleaved: a change of the machine's load touches every variant alike
            for name, fn in variants.items():
                times[name] += timed(fn, x, 0, 1)
        for name, t in times.items():
            rows.append({"variant": name, "batch": b, "ms_per_image": 1000 * statistics.median(t) / b,
                         "ms_per_image_min": 1000 * min(t) / b, "repeats": args.repeats})
            r = rows[-1]
            print(f"batch {b} {name:22s} {r['ms_per_image']:8.2f} ms/image (min {r['ms_per_image_min']:.2f})",
                  flush=True)

    cfg = model.fod.cfg
    info = {"command": "python benchmarks/export_latency.py " + shlex.join(sys.argv[1:] if argv is None else argv),
            "note": args.note, "checkpoint": str(args.checkpoint),
            "model": {"backbone": cfg.backbone, "levels": model.fod.backbone.levels, "image_size": s,
                      "d_model": model.fod.d_models, "heads": cfg.n_heads, "layers": cfg.n_layers},
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
                        "load_average_at_start": os.getloadavg()},
            "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__,
                         "python": platform.python_version()},
            "rows": rows}
    out = HERE / "results" / f"{args.name}.json"
    out.write_text(json.dumps(info, indent=2))
    by = {(r["variant"], r["batch"]): f"{r['ms_per_image']:.1f} ({r['ms_per_image_min']:.1f})" for r in rows}
    batches = sorted({r["batch"] for r in rows})
    load = info["machine"]["load_average_at_start"][0]
    md = [f"# Exported model latency on CPU ({args.name})", "",
          f"Command: `{info['command']}`", "", *([args.note, ""] if args.note else []),
          f"Model: {cfg.backbone} {model.fod.backbone.levels}, {s}x{s} input, d_model {model.fod.d_models}, "
          f"{cfg.n_heads} heads, {cfg.n_layers} layers. Machine: {info['machine']['cpu']}, {os.cpu_count()} cores, "
          f"{args.threads} threads per variant; load average at start {load:.1f} "
          f"(a shared machine). torch {torch.__version__}, onnxruntime {ort.__version__}.", "",
          f"Milliseconds per image: median (min) of {args.repeats} calls / batch size; maps + image scores.", "",
          "| variant | " + " | ".join(f"batch {b}" for b in batches) + " |",
          "|---|" + "---|" * len(batches)]
    for name in variants:
        md.append(f"| {name} | " + " | ".join(by[(name, b)] for b in batches) + " |")
    (HERE / "results" / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
