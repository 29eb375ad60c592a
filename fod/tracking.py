"""What a run logs as it goes: ``RUN/log.csv`` (one row per epoch) and, when the ``tensorboard`` package is
installed (and not ``--no-tensorboard``), TensorBoard event files under ``RUN/tensorboard/``. Watch a run with
``tensorboard --logdir RUN``, compare runs with ``tensorboard --logdir PARENT`` (docs/TRACKING.md).

Steps. Training step s (1-based) of epoch e (1-based) is the global step (e - 1) * steps_per_epoch + s, the same
in a resumed run (--resume keeps the global batch and the data, hence steps_per_epoch). An epoch's scalars are
logged at its last step, an evaluation at the last step of the epoch it evaluated.

Resuming. log.csv is rewritten whole (atomically) after every epoch: the training columns from the run's history
(the checkpoint's), the columns other commands added (evaluations) kept from the file for the epochs the
checkpoint has: it never holds an epoch the checkpoint lacks. A resumed run's event writer starts with
TensorBoard's purge marker at its first step, so the steps a killed run logged after its last checkpoint are
dropped by TensorBoard's reader: the curves continue with no duplicate and no restarted step.

Only the process that writes the run's files logs (rank 0 under torchrun); the caller makes no RunLog elsewhere.
"""
from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Optional

from .files import EVENTS_GLOB, LOGS, atomic_write_text, writing

CSV_NAME, EVENTS_NAME = LOGS
# log.csv's columns from a training run's history, in this order (the history's keys)
TRAIN_COLUMNS = ("loss", "rec", "k_intra", "k_inter", "e_intra", "e_inter", "lr", "seconds", "images_per_second")
STEP_TERMS = ("loss", "rec", "k_intra", "k_inter", "e_intra", "e_inter")  # logged per step too
EVAL_METRICS = ("image_auroc", "pixel_auroc", "aupro")
HEATMAPS = 4  # test images shown as heat maps (the most and least anomalous defect and normal image)
_noted = []  # the missing-package note is said once per process


def _writer_class(log):
    """torch's SummaryWriter, or None (with a note, once) when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _noted:
            _noted.append(True)
            log(f"fod: the tensorboard package is not installed: training curves go to {CSV_NAME} only (pip install "
                "tensorboard for the event files; --no-tensorboard says this is meant)")
        return None
    return SummaryWriter


def _after_earlier_files(folder: Path) -> bool:
    """Whether ``folder`` holds event files of earlier writers; if one was made in this very second, wait for the
    next: TensorBoard reads a folder's event files in the order of their names, which start with the second they
    were made in, and a purge marker must come after what it purges (and an added evaluation after the purge
    marker of the run it is added to)."""
    seconds = [int(p.name.split(".")[3]) for p in folder.glob(EVENTS_GLOB)
               if len(p.name.split(".")) > 3 and p.name.split(".")[3].isdigit()]
    if seconds:
        time.sleep(min(1.0, max(0.0, max(seconds) + 1 - time.time())))  # 1 s at most (another machine's clock)
    return bool(seconds)


def read_rows(path) -> list[dict]:
    """log.csv's rows as {column: value} (epoch as int, the others as float; empty cells left out)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            try:
                rows.append({k: int(v) if k == "epoch" else float(v) for k, v in r.items()
                             if k and v not in ("", None)})
            except ValueError as exc:
                raise ValueError(f"{path} is not a log written by fod ({exc}); move it away and fod writes it "
                                 "anew from the checkpoint's history") from None
    return [r for r in rows if "epoch" in r]


def write_rows(path, rows: list[dict]):
    """The rows as CSV (columns: epoch, step, the training columns, then the others in the order first seen);
    written atomically. Floats are written exactly (Python's shortest round-trip form)."""
    cols = ["epoch", "step", *TRAIN_COLUMNS]
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", restval="")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def history_row(h: dict, steps_per_epoch: int) -> dict:
    """log.csv's training columns of one epoch of a run's history."""
    return {"epoch": h["epoch"], "step": h["epoch"] * steps_per_epoch,
            **{k: h[k] for k in TRAIN_COLUMNS if h.get(k) is not None}}


class RunLog:
    """The log of one run in ``folder``: log.csv and (with ``tensorboard``) the event files.

    ``rows``: the rows already logged (a resumed run's); ``purge_step``: the first step this writer logs, from
    which TensorBoard drops what earlier writers in the folder logged (None: drop nothing)."""

    def __init__(self, folder, *, steps_per_epoch: int, tensorboard: bool, rows=(), purge_step: Optional[int] = 0,
                 log=None):
        self.folder, self.spe = Path(folder), steps_per_epoch
        self.rows = {r["epoch"]: dict(r) for r in rows}
        self.purge_step = purge_step
        self._writer_cls = _writer_class(log or (lambda m: None)) if tensorboard else None
        self._writer = None  # made at the first event: a run that logs nothing leaves no files

    @classmethod
    def for_training(cls, folder, *, steps_per_epoch: int, history: list, resume: bool, tensorboard: bool, log=None):
        """A training run's log: a fresh run starts both logs over (TensorBoard drops whatever a killed run left
        in the folder); a resumed run continues from the checkpoint's ``history``: the epochs it has that log.csv
        lacks (a run killed between its checkpoint and its log, or one from before the logs) are logged now."""
        kept = {r["epoch"]: r for r in read_rows(Path(folder) / CSV_NAME)} if resume else {}
        rows = [{**kept[h["epoch"]], **history_row(h, steps_per_epoch)} for h in history if h["epoch"] in kept]
        start = history[-1]["epoch"] if history else 0
        rl = cls(folder, steps_per_epoch=steps_per_epoch, tensorboard=tensorboard, rows=rows,
                 purge_step=start * steps_per_epoch + 1 if resume else 0, log=log)
        for h in history:
            if h["epoch"] not in kept:
                rl.epoch(h)
        return rl

    @property
    def events(self) -> bool:
        """Whether this log writes TensorBoard event files."""
        return self._writer_cls is not None

    def step_of(self, epoch: int) -> int:
        return epoch * self.spe

    @property
    def writer(self):
        if self._writer is None and self._writer_cls is not None:
            path = self.folder / EVENTS_NAME
            with writing(path):
                path.mkdir(parents=True, exist_ok=True)
                earlier = _after_earlier_files(path)
                self._writer = self._writer_cls(str(path), purge_step=self.purge_step if earlier else None,
                                                flush_secs=30)
        return self._writer

    def _scalars(self, values: dict, step: int):
        if not self.events:
            return
        for tag, v in values.items():
            if v is not None and math.isfinite(v):  # a branch left out has NaN terms: no point
                self.writer.add_scalar(tag, v, step)

    def train_step(self, step: int, values: dict):
        """One training step's loss and terms at global ``step`` (TensorBoard only)."""
        self._scalars({f"step/{k}": float(values[k]) for k in STEP_TERMS if k in values}, step)

    def epoch(self, h: dict):
        """One epoch of the history: a log.csv row and the epoch scalars; flushed (a watcher sees it now)."""
        row = history_row(h, self.spe)
        self.rows[h["epoch"]] = {**self.rows.get(h["epoch"], {}), **row}
        self._write_csv()
        self._scalars({f"epoch/{k}": row[k] for k in TRAIN_COLUMNS if k in row}, row["step"])
        self.flush()

    def evaluation(self, epoch: int, values: dict, group: str):
        """Metrics of the model after ``epoch``: columns GROUP/NAME of its log.csv row, scalars GROUP/NAME."""
        named = {f"{group}/{k}": float(v) for k, v in values.items() if v is not None}
        self.rows[epoch] = {**self.rows.get(epoch, {"epoch": epoch, "step": self.step_of(epoch)}), **named}
        self._write_csv()
        self._scalars(named, self.step_of(epoch))
        self.flush()

    def heatmaps(self, epoch: int, examples, group: str):
        """(caption, HxWx3 uint8 overlay) pairs as images GROUP/<first line of the caption>."""
        if not self.events:
            return
        for caption, image in examples:
            self.writer.add_image(f"{group}/{caption.splitlines()[0]}", image, self.step_of(epoch), dataformats="HWC")
        self.flush()

    def _write_csv(self):
        write_rows(self.folder / CSV_NAME, [self.rows[e] for e in sorted(self.rows)])

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def evaluation_values(res: dict) -> dict:
    """The metrics logged for an evaluation (fod.evaluate.evaluate's result)."""
    return {k: res[k] for k in (*EVAL_METRICS, "eval_images_per_second")}


def add_evaluation(folder, checkpoint: dict, values: dict, group: str, *, tensorboard: bool, examples=(), log=None):
    """Add an evaluation of the model in ``checkpoint`` to the log in ``folder`` (fod test's, or a training run's
    for fod benchmark): its log.csv row of the checkpoint's epoch, and events at the checkpoint's step."""
    spe = checkpoint.get("steps_per_epoch")
    if spe is None and log:
        log("fod: the checkpoint predates step counting: its evaluation is logged at step = epoch")
    rl = RunLog(folder, steps_per_epoch=spe or 1, tensorboard=tensorboard, rows=read_rows(Path(folder) / CSV_NAME),
                purge_step=None, log=log)
    try:
        rl.evaluation(checkpoint["epoch"], values, group)
        rl.heatmaps(checkpoint["epoch"], examples, group)
    finally:
        rl.close()
