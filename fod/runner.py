"""How a training run is spread over processes, behind one object: the training loop (``fod.train``) asks the
runner to shard, forward, reduce and backward, and has no distributed branches of its own.

``Runner`` is one process: every method is the plain call. ``DDPRunner`` is one of several processes under
torchrun (``fod.distributed``): DistributedDataParallel over the level models, each global batch shared out,
the loss all-reduced, features and the reference memory gathered. The step of N processes with
``--batch-size`` b equals the single-process step with batch N * b.
"""
from __future__ import annotations

import dataclasses
import math

from . import distributed
from .checkpoint import NonFiniteError


class Runner:
    """A training run in one process."""

    def __init__(self, ctx: distributed.Context = distributed.SINGLE):
        self.ctx = ctx
        self.models = None

    @property
    def is_main(self) -> bool:
        """This process logs, writes every file and returns the metrics."""
        return self.ctx.is_main

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    def log(self, log):
        """The log this process writes to (the processes other than rank 0 are quiet)."""
        return log if self.is_main else distributed.quiet

    def configure(self, cfg):
        """The configuration as this process runs it (under torchrun: its own GPU)."""
        return cfg

    def output(self, folder):
        """The output folder's context: rank 0 stages and commits, the others have a stand-in."""
        return folder.open()

    def shard(self, ds):
        """The part of ``ds`` whose features this process extracts."""
        return ds

    reduce_sums = None  # fod.model.reference_memory's ``reduce``: the identity in one process

    def gather(self, cached):
        """Every process's cached features (a global batch may need any image)."""
        return cached

    def wrap(self, models, device: str, find_unused: bool):
        """Take the level models to train (``forward`` runs them)."""
        self.models = models

    def forward(self, feats, memories) -> list:
        """[(recon, intra stats, inter stats)] per level."""
        return [m(f, mem) for f, m, mem in zip(feats, self.models, memories)]

    def share(self, idx):
        """(this process's indices of the global batch ``idx``, its loss weight; None in one process)."""
        return idx, None

    def reduce_loss(self, value: float, parts: dict, share, device, diagnose):
        """The global batch's loss and parts; a non-finite loss raises NonFiniteError(``diagnose(value)``)
        before any weight is updated."""
        if not math.isfinite(value):
            raise NonFiniteError(diagnose(value))
        return value, parts

    def backward(self, loss, share, where: str):
        loss.backward()


class DDPRunner(Runner):
    """One of several processes under torchrun (the process group is up: ``fod.distributed.setup``)."""

    def configure(self, cfg):
        return dataclasses.replace(cfg, device=distributed.local_device(cfg.device, self.ctx))

    def output(self, folder):
        return folder.open() if self.is_main else distributed.no_folder(folder.path)

    def shard(self, ds):
        return distributed.shard_of(ds, self.ctx)

    @staticmethod
    def reduce_sums(sums, count):
        return distributed.all_reduce_sum(sums, count)

    def gather(self, cached):
        if cached is None:
            return None
        return [distributed.all_gather_rows(f, "gathering the features", self.ctx) for f in cached]

    def wrap(self, models, device: str, find_unused: bool):
        self.models = distributed.wrap(models, device, find_unused=find_unused, ctx=self.ctx)

    def forward(self, feats, memories) -> list:
        return self.models(feats, memories)

    def share(self, idx):
        return distributed.batch_share(idx, self.ctx)

    def reduce_loss(self, value: float, parts: dict, share, device, diagnose):
        mine = value
        value, parts = distributed.global_means(value, parts, share, device, self.ctx)
        if not math.isfinite(value):  # every process stops here, rank 0 names the term
            raise NonFiniteError(distributed.first_message(
                diagnose(mine) if share and not math.isfinite(mine) else None, self.ctx))
        return value, parts

    def backward(self, loss, share, where: str):
        with distributed.collective(where, self.ctx):
            (loss * share).backward()  # DDP averages the gradients over the processes


def runner_for(ctx: distributed.Context = None) -> Runner:
    """The runner of this process: DDPRunner under torchrun with several processes, else Runner."""
    ctx = ctx or distributed.current()
    return DDPRunner(ctx) if ctx.distributed else Runner(ctx)

