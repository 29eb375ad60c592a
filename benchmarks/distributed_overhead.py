"""Per-step cost of training on 2 processes (torchrun, gloo, CPU) against 1, at the demo configuration.

    python benchmarks/distributed_overhead.py [--repeats 3] [--images 240] [--epochs 3] [--threads 1]
                                              [--backend cpu] [--name cpu_distributed_overhead]

Three configurations, each launched with ``python -m torch.distributed.run --standalone`` and timed inside the
workers (``fod.train.train_epoch``, the training code itself, on cached features; no file is written):

- ``1 x b``: one process, batch b (the demo's 8): the work of one process of the 2-process run;
- ``1 x 2b``: one process, batch 2b: the same global batch, hence the same steps as the 2-process run;
- ``2 x b``: two processes (DistributedDataParallel over gloo), b per process, global batch 2b.

Per-step time = epoch time / steps, averaged over ``--epochs`` measured epochs after one warm-up epoch;
the configurations are interleaved ``--repeats`` times and the medians reported with the spread. The
overhead of distribution is ``2 x b`` against ``1 x b`` (same work per process: what the all-reduces and
the synchronisation cost, when each process has a core of its own), and the speed-up is ``1 x 2b``
against ``2 x b`` (same global step). Every process uses ``--threads`` threads (default 1), so that two
processes need two cores. The features are random tensors of the demo's shapes (layer2 of resnet18 at
128 px: 16x16 tokens, 128 channels): the step's cost does not depend on their values, and a real backbone
pass would only add start-up time. The machine's load average is recorded before and after each launch:
on a machine shared with other work the numbers are only as good as those loads.

Results: ``benchmarks/results/<name>.json`` and ``<name>.md`` (with the command).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (("1 x b", 1, 1), ("1 x 2b", 1, 2), ("2 x b", 2, 1))  # (name, processes, batch multiple)


def worker(args):
    import warnings

    import torch

    from fod import checkpoint as C
    from fod import distributed as D
    from fod.backbone import build_backbone
    from fod.config import DEMO_DEFAULTS, Config
    from fod.model import FOD, resolve_backend
    from fod.runner import runner_for
    from fod.train import train_epoch

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    ctx = D.setup() if D.launched() else D.SINGLE
    cfg = Config(data="-", **{**DEMO_DEFAULTS, "batch_size": args.batch_size}, backend=args.backend)
    C.seed_all(0)
    backbone = build_backbone(cfg)
    grids = backbone.check_image_size(cfg.image_size)
    fod = FOD(cfg, backbone, grids)
    fod.set_backend(resolve_backend(cfg.backend, torch.device("cpu")))
    g = torch.Generator().manual_seed(0)
    cached = [torch.randn(args.images, h * w, c, generator=g) for (h, w), c in zip(grids, backbone.channels)]
    fod.memories = [f.mean(0) for f in cached]
    runner = runner_for(ctx)
    runner.wrap(fod.models, "cpu", find_unused=False)
    opt = torch.optim.Adam(fod.models.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    steps = math.ceil(args.images / (args.batch_size * ctx.world_size))
    per_step = []
    for epoch in range(1 + args.epochs):
        t0 = time.perf_counter()
        train_epoch(fod, opt, cfg, gen, args.images, cached=cached, runner=runner, epoch=epoch + 1)
        if epoch:  # the first epoch warms up (allocations, gloo buffers)
            per_step.append((time.perf_counter() - t0) / steps)
    comm = communication(fod, ctx) if ctx.distributed else None
    if ctx.is_main:
        print("RESULT " + json.dumps({"processes": ctx.world_size, "batch_per_process": args.batch_size,
                                      "steps_per_epoch": steps, "seconds_per_step": per_step,
                                      "backend": fod.backend, "communication_ms": comm}), flush=True)
    D.shutdown()


def communication(fod, ctx, reps: int = 100) -> dict:
    """The collectives of one training step alone, in ms: DDP's all-reduce of every gradient (one bucket of
    all the parameters: they fit DDP's default 25 MB bucket) and the step's all-reduce of the loss."""
    import torch
    import torch.distributed as dist
    grads = torch.zeros(sum(p.numel() for p in fod.models.parameters()))
    loss = torch.zeros(4, dtype=torch.float64)

    def clock(t):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(t)
        return 1e3 * (time.perf_counter() - t0) / reps
    return {"parameters": grads.numel(), "gradient_all_reduce": clock(grads), "loss_all_reduce": clock(loss)}


def launch(args, processes: int, batch: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
           __file__, "--worker", "--batch-size", str(batch), "--images", str(args.images), "--epochs",
           str(args.epochs), "--threads", str(args.threads), "--backend", args.backend]
    load0 = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "load_before": load0, "load_after": os.getloadavg()[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=8, help="b: the batch per process (default 8, the demo's)")
    ap.add_argument("--images", type=int, default=240, help="training images (cached features) per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="measured epochs (after one warm-up epoch)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved launches of each configuration")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--backend", default="cpu", help="I2Correlation backend (default cpu, the fused kernel)")
    ap.add_argument("--name", default="cpu_distributed_overhead", help="results file name (no extension)")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    runs = {name: [] for name, _, _ in CONFIGS}
    for rep in range(args.repeats):
        for name, procs, mult in CONFIGS:
            r = launch(args, procs, args.batch_size * mult)
            runs[name].append(r)
            print(f"repeat {rep + 1}/{args.repeats} {name}: {1e3 * statistics.mean(r['seconds_per_step']):.1f} "
                  f"ms/step (load {r['load_before']:.1f} -> {r['load_after']:.1f})", flush=True)
    summary = {}
    for name, procs, mult in CONFIGS:
        means = [statistics.mean(r["seconds_per_step"]) for r in runs[name]]
        global_batch = procs * args.batch_size * mult
        summary[name] = {"processes": procs, "batch_per_process": args.batch_size * mult,
                         "global_batch": global_batch, "ms_per_step_median": 1e3 * statistics.median(means),
                         "ms_per_step_min": 1e3 * min(means), "ms_per_step_max": 1e3 * max(means),
                         "images_per_s": global_batch / statistics.median(means)}
    one, same, two = (summary[n]["ms_per_step_median"] for n, _, _ in CONFIGS)
    comm = [r["communication_ms"] for r in runs["2 x b"]]
    communication_ms = {"parameters": comm[0]["parameters"],
                        **{k: statistics.median(c[k] for c in comm) for k in ("gradient_all_reduce",
                                                                              "loss_all_reduce")}}
    result = {
        "command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": __import__("torch").__version__},
        "settings": {k: getattr(args, k) for k in ("batch_size", "images", "epochs", "repeats", "threads", "backend")},
        "summary": summary,
        "overhead_2xb_vs_1xb": {"ms_per_step": two - one, "relative": two / one - 1},
        "speedup_2xb_vs_1x2b": same / two,
        "communication_ms_per_step": communication_ms,
        "runs": runs,
    }
    out = ROOT / "benchmarks" / "results"
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    s, m = r["settings"], r["machine"]
    loads = [x for runs in r["runs"].values() for run in runs for x in (run["load_before"], run["load_after"])]
    lines = ["# Distributed training overhead (CPU, gloo)", "", "Command:", "", "```", r["command"], "```", "",
             f"Machine: {m['cpus']} CPUs ({m['affinity']} usable), {m['platform']}, Python {m['python']}, torch "
             f"{m['torch']}. Load average during the runs: {min(loads):.1f} to {max(loads):.1f} (1-minute; the "
             "machine is shared with other work).", "",
             f"Demo configuration (resnet18 layer2 at 128 px: 256 tokens x 128 channels, d_model 64, 4 heads, 2 "
             f"layers), backend {s['backend']}, {s['threads']} thread(s) per process, {s['images']} images per "
             f"epoch, {s['epochs']} measured epochs per launch, {s['repeats']} interleaved launches per "
             "configuration (median, with min and max over the launches).", "",
             "| configuration | processes | batch per process | global batch | ms per step (median) | min | max "
             "| images/s |", "|---|---|---|---|---|---|---|---|"]
    for name, x in r["summary"].items():
        lines.append(f"| {name} | {x['processes']} | {x['batch_per_process']} | {x['global_batch']} | "
                     f"{x['ms_per_step_median']:.1f} | {x['ms_per_step_min']:.1f} | {x['ms_per_step_max']:.1f} | "
                     f"{x['images_per_s']:.1f} |")
    o, c = r["overhead_2xb_vs_1xb"], r["communication_ms_per_step"]
    lines += ["", f"Overhead of 2 processes against 1 at the same batch per process (2 x b vs 1 x b): "
              f"{o['ms_per_step']:+.1f} ms per step ({100 * o['relative']:+.1f}%). Speed-up of 2 processes over "
              f"one process with the same global batch (1 x 2b vs 2 x b): {r['speedup_2xb_vs_1x2b']:.2f}x.", "",
              f"The step's collectives alone (2 processes, median over the launches of 100 repetitions each): "
              f"all-reduce of the {c['parameters']} gradients {c['gradient_all_reduce']:.2f} ms, all-reduce of the "
              f"loss {c['loss_all_reduce']:.2f} ms: {c['gradient_all_reduce'] + c['loss_all_reduce']:.2f} ms per "
              "step. The rest of the overhead above is the two processes' competition for the machine's cores "
              "(with each other and with the other work on it): with a free core per process, 2 x b should take "
              "about the time of 1 x b plus these collectives (not measured here: no such machine).", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
