"""``fod benchmark``: every category of a dataset root with one configuration, with baselines and ablations.

For each category, ``OUTPUT/<category>`` is a normal run folder (``fod train``'s products) plus
``baselines.json`` (``fod.baselines``: knn, memory_distance and FOD's ablations, on the same features). The
benchmark is resumable: a finished category is skipped, an interrupted one resumes from its checkpoint, a
failed one is reported (``OUTPUT/<category>/error.txt``) and the others go on. With several ``devices``
each category runs in its own process on a free device, one process per device at a time.

Results: ``OUTPUT/results.json`` (a list: a record per category and one with category "mean"),
``results.csv``, ``results.md`` (the paper-style tables, with the configuration and versions) and a bar
chart per metric (``results_<metric>.png``).

The paper's own per-category numbers (arXiv:2308.02983) are not included: they could not be verified
from a citable copy of its tables when this was written, and numbers that cannot be verified are left out.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

from .config import Config, from_dict, load_toml, resume_differences, to_dict
from .files import atomic_write_text
from .layouts import LAYOUTS
from .version import __version__

METRICS = ("image_auroc", "pixel_auroc", "aupro")
METRIC_TITLES = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO@0.3"}
BASELINES_FILE = "baselines.json"
ERROR_FILE = "error.txt"


def say(msg: str):
    from .report import say as _say
    _say(msg)


# ----------------------------------------------------------------------------- categories

def find_categories(root, dataset: str, chosen: Optional[list[str]] = None, log=say) -> list[str]:
    """The categories to run: ``chosen`` (each must exist), else the dataset's standard categories found under
    ``root`` (in the paper's order), else (an unknown root) every sub-folder with the layout's training folder
    (VisA: every object of the split file that has a folder)."""
    root = Path(root)
    if dataset not in LAYOUTS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {tuple(LAYOUTS)}")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    layout = LAYOUTS[dataset]
    present = layout.present(root)
    what = layout.looked_for()
    if chosen:
        missing = [c for c in chosen if c not in present]
        if missing:
            raise FileNotFoundError(f"--categories: {', '.join(missing)} not found under {root} as a {dataset} "
                                    f"category; found: {', '.join(present) or 'none'}")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"--categories lists a category twice: {','.join(chosen)}")
        return list(chosen)
    if not present:
        raise FileNotFoundError(f"no {dataset} categories under {root} (looked for {what})")
    standard = [c for c in layout.categories if c in present]
    if not standard:
        return present
    others = [c for c in present if c not in standard]
    missing = [c for c in layout.categories if c not in present]
    if missing:
        log(f"fod benchmark: {len(standard)} of the {len(layout.categories)} standard {dataset} categories "
            f"found; missing: {', '.join(missing)}")
    if others:
        log(f"fod benchmark: ignoring {', '.join(others)} (not standard {dataset} categories; name them in "
            "--categories to include them)")
    return standard


# ----------------------------------------------------------------------------- one category

def category_config(base: Config, root, category: str) -> Config:
    return dataclasses.replace(base, data=str(Path(root).resolve() / category))


def saved_config_conflict(cfg: Config, run: Path) -> Optional[str]:
    """Why ``run`` (an earlier run folder) cannot be continued with ``cfg``, or None."""
    path = run / "config.toml"
    if not path.is_file():
        return None
    try:
        saved = from_dict(load_toml(path), where=str(path))
    except (ValueError, FileNotFoundError) as exc:
        return str(exc)
    diff = resume_differences(saved, cfg)
    if diff:
        return f"{run} was run with another configuration: " + ", ".join(
            f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
    return None


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _finished(run: Path, cfg: Config) -> bool:
    m = run / "metrics.json"
    return m.is_file() and _read_json(m).get("epochs") == cfg.epochs


def _baselines_current(run: Path, coreset: float, epoch: int) -> bool:
    p = run / BASELINES_FILE
    if not p.is_file():
        return False
    b = _read_json(p)
    return b.get("coreset") == coreset and b.get("checkpoint_epoch") == epoch


def run_category(cfg: Config, run: Path, *, coreset: float = 1.0, overwrite: bool = False, log=say) -> dict:
    """Train (or resume, or skip if finished), evaluate and compute the baselines of one category; returns its
    record. Raises on failure."""
    from . import baselines, calibrate, checkpoint, tracking
    from .data import AnomalyDataset
    from .train import train
    run = Path(run)
    name = run.name
    (run / ERROR_FILE).unlink(missing_ok=True)
    done = _read_json(run / "metrics.json").get("epochs") if (run / "metrics.json").is_file() else None
    if not overwrite and done is not None and done > cfg.epochs:
        raise ValueError(f"{run} was trained for {done} epochs, more than --epochs {cfg.epochs}; use --overwrite "
                         "or another --output")
    if overwrite or not _finished(run, cfg):
        resume = not overwrite and (run / "checkpoint.pt").is_file()
        log(f"fod benchmark: {name}: " + ("resuming from its checkpoint" if resume else "training"))
        train(cfg, run, resume=resume, overwrite=overwrite, log=lambda m: log(f"[{name}] {m}"))
    else:
        log(f"fod benchmark: {name}: finished earlier, training skipped")
    metrics = _read_json(run / "metrics.json")
    ck = run / "checkpoint.pt"
    epoch = metrics.get("epochs")
    if overwrite or not _baselines_current(run, coreset, epoch):
        log(f"fod benchmark: {name}: baselines and ablations")
        fod = checkpoint.load(ck, cfg.device, cfg.backend)
        pre = fod.preprocess()  # exactly the training run's preprocessing
        train_ds = AnomalyDataset(cfg.data, "train", cfg.dataset, pre=pre)
        train_ds = calibrate.datasets(fod.cfg, train_ds)[0]  # the images FOD trained on: not its calibration images
        test_ds = AnomalyDataset(cfg.data, "test", cfg.dataset, pre=pre)
        res = baselines.compute(fod, train_ds, test_ds, cfg, cfg.device, coreset=coreset,
                                log=lambda m: log(f"[{name}] {m}"))
        res.pop("maps")
        main = metrics.get("final_epoch", metrics)  # compat-official: the final model, not the selected epochs
        own = res["methods"][baselines.method_names(fod)[-1]]  # FOD's own score, recomputed: must equal the main result
        res["fod_check"] = {k: abs(own[k] - main[k]) for k in METRICS}
        res["checkpoint_epoch"] = epoch
        atomic_write_text(run / BASELINES_FILE, json.dumps(res, indent=2))
        values = {f"{n}/{k}": v[k] for n, v in res["methods"].items() for k in METRICS}
        tracking.add_evaluation(run, fod.checkpoint, values, "baseline", tensorboard=cfg.tensorboard,
                                log=lambda m: log(f"[{name}] {m}"))  # tensorboard --logdir OUTPUT compares them all
    return category_record(name, run)


def category_record(name: str, run: Path) -> dict:
    m = _read_json(run / "metrics.json")
    b = _read_json(run / BASELINES_FILE)
    return {"category": name, "status": "ok", **{k: m[k] for k in METRICS},
            "train_seconds": m.get("train_seconds"), "eval_images_per_second": m.get("eval_images_per_second"),
            "epochs": m.get("epochs"), "protocol": m.get("protocol"), "score": m.get("score"),
            "weights": m.get("weights"), "backend": m.get("backend"),
            "baselines": {n: {k: v[k] for k in METRICS} for n, v in b["methods"].items()},
            "baseline_seconds": {n: v["seconds"] for n, v in b["methods"].items()},
            "fod_check": b.get("fod_check"), "run": str(run)}


def _failure(name: str, run: Path, message: str) -> dict:
    return {"category": name, "status": "failed", "error": message, **dict.fromkeys(METRICS),
            "train_seconds": None, "eval_images_per_second": None, "baselines": {}, "run": str(run)}


def _write_error(run: Path, exc: BaseException):
    run.mkdir(parents=True, exist_ok=True)
    text = f"{type(exc).__name__}: {exc}\n\n" + "".join(traceback.format_exception(exc))
    atomic_write_text(run / ERROR_FILE, text)


def _child(cfg_dict: dict, run: str, device: str, coreset: float, overwrite: bool, threads: int):
    """Entry point of a category's own process (spawned): run it, or write error.txt and exit 1."""
    try:  # die with the benchmark process (Linux)
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    import torch

    from .interrupt import install
    install()  # terminated by the benchmark process: clean up as after SIGINT
    torch.set_num_threads(threads)
    cfg = from_dict({**cfg_dict, "device": device})
    name = Path(run).name
    try:
        run_category(cfg, Path(run), coreset=coreset, overwrite=overwrite)
    except BaseException as exc:
        _write_error(Path(run), exc)
        say(f"fod benchmark: {name} FAILED on {device}: {type(exc).__name__}: {exc}")
        sys.exit(1)


# ----------------------------------------------------------------------------- the whole benchmark

def _threads(n_procs: int) -> int:
    if os.environ.get("FOD_THREADS"):
        return max(1, int(os.environ["FOD_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // n_procs)


def _run_parallel(jobs: list, devices: list[str], coreset: float, overwrite: bool, on_done, log=say) -> dict:
    """Each (name, cfg, run) job in its own spawned process on a free device; ``on_done(records)`` after each.
    Returns {name: record}."""
    import multiprocessing as mp
    from multiprocessing.connection import wait
    ctx = mp.get_context("spawn")
    pending, running, records = list(jobs), {}, {}
    free = list(devices)
    threads = _threads(len(devices))
    tqdm_env = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # inherited by the children: parallel progress bars would garble each other
    try:
        while pending or running:
            while pending and free:
                name, cfg, run = pending.pop(0)
                dev = free.pop(0)
                p = ctx.Process(target=_child, args=(to_dict(cfg), str(run), dev, coreset, overwrite, threads),
                                name=f"fod-benchmark-{name}")
                p.start()
                log(f"fod benchmark: {name} started on {dev} (process {p.pid})")
                running[p.sentinel] = (p, name, run, dev)
            for s in wait(list(running)):
                p, name, run, dev = running.pop(s)
                p.join()
                free.append(dev)
                if p.exitcode == 0:
                    try:
                        records[name] = category_record(name, run)
                    except (OSError, ValueError, KeyError) as exc:
                        records[name] = _failure(name, run, f"results unreadable after the run: {exc}")
                else:
                    err = run / ERROR_FILE
                    msg = err.read_text(encoding="utf-8").splitlines()[0] if err.is_file() else \
                        f"its process ended with exit code {p.exitcode}" + (
                            f" (signal {-p.exitcode})" if p.exitcode and p.exitcode < 0 else "")
                    if not err.is_file():
                        _write_error(run, RuntimeError(msg))
                    records[name] = _failure(name, run, msg)
                    log(f"fod benchmark: {name} FAILED: {msg} (details in {run / ERROR_FILE}); going on with the "
                        "others")
                on_done(records)
    except BaseException:
        for p, *_ in running.values():
            p.terminate()
        for p, *_ in running.values():
            p.join()
        raise
    finally:
        if tqdm_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_env
    return records


def benchmark(base: Config, root, dataset: str, output, *, categories: Optional[list[str]] = None,
              devices: Optional[list[str]] = None, coreset: float = 1.0, overwrite: bool = False,
              command: Optional[str] = None, log=say) -> list[dict]:
    """Run the benchmark; returns the records (as results.json). A failed category has status "failed".

    Under torchrun (several processes) whole categories are spread over the processes (rank r runs the
    categories r, r + N, ... one after the other, each as a single-process run on its own device: the results
    equal those of one process); rank 0 gathers the records and writes the results files, and returns all of
    them; the other processes return their own."""
    from . import distributed
    from .checkpoint import check_format
    from .baselines import coreset_size
    ctx = distributed.current()
    coreset_size(1, coreset)  # validates the ratio
    root = Path(root).resolve()
    out = Path(output)
    base = dataclasses.replace(base, dataset=dataset, data=str(root))
    names = find_categories(root, dataset, categories, log if ctx.is_main else distributed.quiet)
    if ctx.distributed and devices:
        raise ValueError("--devices is for one process; under torchrun every process takes one device (--device cuda: "
                         "the GPU of its local rank)")
    devices = [distributed.local_device(base.device)] if ctx.distributed else \
        list(devices) if devices else [base.device]
    for d in devices:
        dataclasses.replace(base, device=d).check()
    jobs = [(n, category_config(base, root, n), out / n) for n in names]
    for _, cfg, _ in jobs:
        cfg.check()
    if not overwrite:
        conflicts = [c for c in (saved_config_conflict(cfg, run) for _, cfg, run in jobs) if c]
        if conflicts:
            raise FileExistsError("; ".join(conflicts) + ". Use another --output, the same options, or --overwrite "
                                  "to start those categories over")
        for _, _, run in jobs:  # a checkpoint to resume in an old or foreign format: one error now, before any work
            if (run / "checkpoint.pt").is_file():
                check_format((run / "checkpoint.pt").read_bytes(), run / "checkpoint.pt")
    distributed.checks_passed()  # several processes: every one passed its checks (else all stop here)
    if ctx.distributed:
        patient = distributed.patient_group()  # the final gather waits for the slowest process, however long it takes
        jobs = jobs[ctx.rank::ctx.world_size]
        log(f"fod benchmark: {ctx.tag}categories {', '.join(n for n, _, _ in jobs) or '(none)'} on {devices[0]}")
    out.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        log(f"fod benchmark: {len(names)} {dataset} categories from {root}: {', '.join(names)}; devices "
            f"{', '.join(devices)}" + (f" (rank 0 of {ctx.world_size})" if ctx.distributed else "")
            + f"; results in {out}/")
    t0 = time.perf_counter()

    def on_done(records):
        if ctx.is_main:  # under torchrun: rank 0's categories so far; all of them at the end
            write_results(out, [records[n] for n in names if n in records], base, dataset, root, devices, coreset,
                          command)

    records = {}
    if len(devices) == 1:
        for name, cfg, run in jobs:
            try:
                with distributed.single():  # under torchrun too: a category is a single-process run
                    records[name] = run_category(dataclasses.replace(cfg, device=devices[0]), run, coreset=coreset,
                                                 overwrite=overwrite, log=log)
            except Exception as exc:
                _write_error(run, exc)
                log(f"fod benchmark: {name} FAILED: {type(exc).__name__}: {exc} (details in {run / ERROR_FILE}); "
                    "going on with the others")
                records[name] = _failure(name, run, f"{type(exc).__name__}: {exc}")
            on_done(records)
    else:
        records = _run_parallel(jobs, devices, coreset, overwrite, on_done, log)
    if ctx.distributed:
        everyone = distributed.gather_objects(records, "fod benchmark: gathering the results", group=patient)
        if not ctx.is_main:
            return list(records.values())
        records = {k: v for r in everyone for k, v in r.items()}
        devices = [f"{ctx.world_size} torchrun processes ({base.device})"]
    rows = write_results(out, [records[n] for n in names], base, dataset, root, devices, coreset, command)
    failed = [r["category"] for r in rows if r["status"] == "failed"]
    log(f"fod benchmark: {len(names) - len(failed)} of {len(names)} categories done in "
        f"{time.perf_counter() - t0:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else "") +
        f"; results in {out / 'results.md'}")
    return rows


# ----------------------------------------------------------------------------- results files

def _mean(values):
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def mean_record(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    names = list(dict.fromkeys(n for r in ok for n in r["baselines"]))
    return {"category": "mean", "status": "ok" if ok and len(ok) == len(rows) else "partial" if ok else "failed",
            "n_categories": len(ok), "failed": [r["category"] for r in rows if r["status"] != "ok"],
            **{k: _mean([r[k] for r in ok]) for k in METRICS},
            "train_seconds": _mean([r["train_seconds"] for r in ok]),
            "eval_images_per_second": _mean([r["eval_images_per_second"] for r in ok]),
            "baselines": {n: {k: _mean([r["baselines"].get(n, {}).get(k) for r in ok]) for k in METRICS}
                          for n in names}}


def write_results(out: Path, rows: list[dict], base: Config, dataset: str, root: Path, devices, coreset: float,
                  command: Optional[str] = None) -> list[dict]:
    """results.json, results.csv, results.md and results_<metric>.png; returns the rows with the mean record."""
    rows = [r for r in rows if r["category"] != "mean"]
    rows = rows + [mean_record(rows)]
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2))
    names = list(dict.fromkeys(n for r in rows for n in r["baselines"]))
    cols = ["category", "status", *METRICS, "train_seconds", "eval_images_per_second",
            *[f"{n}_{k}" for n in names for k in METRICS], "error"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        flat = {**r, **{f"{n}_{k}": r["baselines"].get(n, {}).get(k) for n in names for k in METRICS}}
        w.writerow(["" if flat.get(c) is None else flat.get(c) for c in cols])
    atomic_write_text(out / "results.csv", buf.getvalue())
    charts = write_charts(out, rows, names)
    atomic_write_text(out / "results.md", results_markdown(rows, names, base, dataset, root, devices, coreset,
                                                          command, charts))
    return rows


def _pct(v) -> str:
    return "–" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def results_markdown(rows, names, base: Config, dataset, root, devices, coreset, command, charts) -> str:
    from .baselines import DESCRIPTIONS
    from .report import versions
    ok = [r for r in rows if r["status"] == "ok" and r["category"] != "mean"]
    backend = ok[0]["backend"] if ok else base.backend
    cfg = {k: v for k, v in to_dict(base).items() if k not in ("data",)}
    lines = [f"# FOD benchmark: {dataset} ({len(rows) - 1} categories)", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    lines += [f"Data: `{root}` ({dataset} layout). Devices: {', '.join(devices)}. "
              f"fod {__version__}. Protocol: {ok[0]['protocol'] if ok else 'n/a'}. Score: "
              f"{ok[0]['score'] if ok else 'n/a'}. Weights: {ok[0]['weights'] if ok else 'n/a'}.", "",
              "Configuration (every category):", "", "```toml",
              *[f"{k} = {json.dumps(v)}" for k, v in cfg.items() if v is not None], "```", "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in versions(backend).items() if v is not None), ""]
    lines += ["Values in % (AUROC, and AUPRO up to FPR 0.3). FOD is the trained model; the other columns are "
              "computed from the same frozen backbone features in the same run, without training: "
              + "; ".join(f"**{n}**: {DESCRIPTIONS[n]}" for n in names)
              + (f" (knn on a greedy coreset of {coreset:g} of the bank)" if coreset < 1 else "") + ".", "",
              "The paper's per-category numbers (arXiv:2308.02983) are not shown: they could not be verified from "
              "a citable copy of its tables.", ""]
    for k in METRICS:
        lines += [f"## {METRIC_TITLES[k]}", "", "| category | FOD | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 2) + "|"]
        for r in rows:
            label = f"**mean** ({r['n_categories']} categories)" if r["category"] == "mean" else r["category"]
            if r["status"] == "failed" and r["category"] != "mean":
                label += " (FAILED)"
            lines.append(f"| {label} | {_pct(r[k])} | " +
                         " | ".join(_pct(r["baselines"].get(n, {}).get(k)) for n in names) + " |")
        if k in charts:
            lines += ["", f"![{METRIC_TITLES[k]}]({charts[k]})"]
        lines.append("")
    lines += ["## Timings", "", "| category | train s | eval images/s | knn s |", "|---|---|---|---|"]
    for r in rows:
        knn = (r.get("baseline_seconds") or {}).get("knn")
        lines.append(f"| {r['category']} | " + " | ".join(
            "–" if v is None else f"{v:.1f}" for v in (r["train_seconds"], r["eval_images_per_second"], knn)) + " |")
    failed = [r for r in rows if r["status"] == "failed" and r["category"] != "mean"]
    if failed:
        lines += ["", "## Failed categories", ""] + [f"- {r['category']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def write_charts(out: Path, rows: list[dict], names: list[str]) -> dict:
    """A grouped bar chart per metric (categories and mean; FOD and each baseline); returns {metric: file name}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    shown = [r for r in rows if r["status"] != "failed" and r[METRICS[0]] is not None]
    if not shown:
        return {}
    methods = ["FOD", *[n for n in names if not n.startswith("rec_x_")]]  # rec_x_*: FOD's own score again
    files = {}
    for k in METRICS:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(shown) * (len(methods) + 1) / 3), 3.6), dpi=110)
        x = np.arange(len(shown))
        w = 0.8 / len(methods)
        for i, m in enumerate(methods):
            vals = [r[k] if m == "FOD" else r["baselines"].get(m, {}).get(k) for r in shown]
            ax.bar(x + (i - (len(methods) - 1) / 2) * w, [np.nan if v is None else v for v in vals], w, label=m)
        ax.set_xticks(x, [r["category"] for r in shown], rotation=30, ha="right")
        ax.set_ylim(0, 1.0)
        ax.set_ylabel(METRIC_TITLES[k])
        ax.legend(fontsize=7, ncol=len(methods), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        files[k] = f"results_{k}.png"
        tmp = out / (files[k] + ".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, out / files[k])
    return files


def parse_list(s: Optional[str]) -> Optional[list[str]]:
    if s is None:
        return None
    items = [x.strip() for x in s.split(",") if x.strip()]
    if not items:
        raise ValueError(f"empty list: {s!r}")
    return items
