"""Several processes: ``torchrun --nproc-per-node N -m fod train|test|benchmark ...`` on PyTorch's own engine.

``setup()`` starts the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT): backend ``cpu:gloo,cuda:nccl`` where CUDA is available (CUDA tensors over NCCL, CPU tensors over
gloo), else gloo, with a timeout on every collective (``FOD_DIST_TIMEOUT`` seconds, default 300), plus a gloo
group for the CPU tensors and Python objects the pipeline exchanges (features, evaluation maps, messages).
Without torchrun, or with one process, nothing is started and every helper here is the identity: the
single-process path is the one it always was. The command line calls ``setup()``; a Python program launched by
torchrun that calls ``fod.train.train`` or ``fod.commands.test`` itself calls ``setup()`` first (and
``shutdown()`` at the end), else each process runs alone.

What the pipeline does with it (``fod.runner`` for training, ``fod.evaluate``, ``fod.benchmark``):

- training: the global batch of N*b images (``--batch-size`` b per process) is the single-process batch of that
  size, in the same seeded order; ``batch_share`` gives each process its part, weighted so that
  DistributedDataParallel's gradient average is the mean over the global batch (a process without an image in
  a short last batch computes a stand-in image with weight 0: it still joins the gradient all-reduce);
  ``global_means`` all-reduces the step's loss (non-finite anywhere: every process stops before the update);
- features: each process extracts its contiguous shard, ``all_gather_rows`` gives every process all of them
  (a batch needs any image); the reference memory is the all-reduced sum over the shards over the count;
- evaluation: each process scores its shard, ``gather_rows``/``gather_objects`` bring them to rank 0, which
  computes the metrics and writes every output (other processes never take the output folder's lock);
- errors: every process runs the checks; ``checks_passed`` (where the run would start writing) settles them
  across processes, so that an error every process hits is printed once, by rank 0, and one that only some
  process hits is printed by rank 0 naming that process. Later, a process that loses another one (it died, or
  did not answer within the timeout) raises ``DistributedError`` and says so; torchrun ends the others.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import inspect
import os
import re
import signal
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

TIMEOUT_ENV = "FOD_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0  # seconds: a collective that waits longer ends the run
COMMANDS = ("train", "test", "benchmark")  # what runs under torchrun; demo and predict are single-process


class DistributedError(RuntimeError):
    """The run lost another of its processes (it failed, was killed, or did not answer within the timeout)."""


class Elsewhere(RuntimeError):
    """An error that another process (rank 0) reports for the whole run: this process ends quietly."""


@dataclasses.dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout: float = DEFAULT_TIMEOUT
    cpu_group: object = None  # the gloo group for CPU tensors and Python objects

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        """How this process names itself in messages ("" for a single process)."""
        return f"[rank {self.rank} of {self.world_size}] " if self.distributed else ""


SINGLE = Context()
_context = SINGLE     # the process group's context once setup() ran
_override = None      # single(): a body that runs as one process although the group is up
_checking = False     # between setup() and checks_passed(): errors are settled across processes
_tqdm_init = None     # tqdm's own __init__ while the other processes' progress bars are off
_sigterm = None       # the SIGTERM handler before setup()


def current() -> Context:
    return _override if _override is not None else _context


def launched() -> bool:
    """True when torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def env_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: give the collective timeout in seconds, a positive number "
                         f"(default {DEFAULT_TIMEOUT:g})")
    return value


def quiet(msg: str):
    """The log of the processes other than rank 0."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the error on its way out is not interrupted again
    raise DistributedError(f"{_context.tag}stopped by torchrun (SIGTERM): another process of the run failed or "
                           "the run was stopped; torchrun's report names the process")


def setup() -> Context:
    """Start the process group from torchrun's environment (when launched() is true)."""
    global _context, _checking, _tqdm_init, _sigterm
    import torch.distributed as dist
    timeout = datetime.timedelta(seconds=timeout_seconds())
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    try:
        dist.init_process_group(backend, timeout=timeout)
        cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    except RuntimeError as exc:
        raise DistributedError(f"cannot start the process group ({backend}, rank {env_rank()}): "
                               f"{_first_line(exc)}") from None
    _context = Context(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0") or 0), timeout=timeout.total_seconds(),
                       cpu_group=cpu_group)
    _checking = True
    if not _context.is_main:  # one set of progress bars: rank 0's
        from tqdm import tqdm
        _tqdm_init = tqdm.__init__
        tqdm.__init__ = functools.partialmethod(tqdm.__init__, disable=True)
    _sigterm = signal.signal(signal.SIGTERM, _on_sigterm)  # torchrun ends the others when one fails: say so
    return _context


def shutdown(destroy: bool = True):
    """End the process group and restore what setup() changed. ``destroy=False`` after an error: the process
    is about to exit (a collective may be stuck): the group is left, and torchrun's SIGTERM is ignored from
    now on, so that the error message gets out."""
    global _context, _checking, _tqdm_init, _sigterm
    import torch.distributed as dist
    if destroy and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _context, _checking = SINGLE, False
    if _sigterm is not None:
        signal.signal(signal.SIGTERM, _sigterm if destroy else signal.SIG_IGN)
        _sigterm = None
    if _tqdm_init is not None:
        from tqdm import tqdm
        tqdm.__init__, _tqdm_init = _tqdm_init, None


@contextmanager
def single():
    """Run the body as one process although the group is up (``fod benchmark`` runs whole categories per rank)."""
    global _override
    old, _override = _override, SINGLE
    try:
        yield
    finally:
        _override = old


def local_device(device: str, ctx: Optional[Context] = None) -> str:
    """This process's device: ``cuda`` is ``cuda:LOCAL_RANK`` under torchrun (one GPU per process)."""
    ctx = ctx or current()
    if not ctx.distributed or not device.startswith("cuda"):
        return device
    if ":" in device:
        raise ValueError(f"--device {device}: under torchrun every process takes the GPU of its local rank; "
                         "pass --device cuda")
    local = f"cuda:{ctx.local_rank}"
    if torch.cuda.is_available() and ctx.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(ctx.local_rank)
    return local


def _first_line(exc: BaseException) -> str:
    """The gist of a backend's message: its first sentence, without gloo's source location."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", lines[0])
    return text.split(". ")[0][:300]


def is_comm_error(exc: BaseException) -> bool:
    """A failure of a collective (a lost or silent peer), as opposed to a failure of the computation."""
    import torch.distributed as dist
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(w in text for w in ("gloo", "NCCL", "Connection closed",
                                                                       "Connection reset", "Timed out"))


def lost(exc: BaseException, what: str, ctx: Optional[Context] = None) -> DistributedError:
    ctx = ctx or current()
    return DistributedError(f"{ctx.tag}{what}: lost another process of the run (it failed, was killed, or did not "
                            f"answer within {ctx.timeout:g} s; {TIMEOUT_ENV} sets the timeout): {_first_line(exc)}")


@contextmanager
def collective(what: str, ctx: Optional[Context] = None):
    """Turn the failure of a collective in the body into a DistributedError that says what happened."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as exc:
        if is_comm_error(exc):
            raise lost(exc, what, ctx) from None
        raise


# ----------------------------------------------------------------------------- settling errors

def _exchange(failure) -> list:
    """Every process's failure (None or (rank, type name, message)); the check phase ends."""
    global _checking
    import torch.distributed as dist
    _checking = False
    ctx = _context
    out = [None] * ctx.world_size
    with collective("settling the checks", ctx):
        dist.all_gather_object(out, failure, group=ctx.cpu_group)
    return out


def checks_passed():
    """Every process calls this where its checks are done, before the first write and the first collective;
    a process whose checks failed reaches the same exchange through ``settle``. If any failed, this raises on
    every process (rank 0 reports, the others end quietly)."""
    ctx = current()
    if not ctx.distributed or ctx is not _context or not _checking:
        return
    failures = [f for f in _exchange(None) if f is not None]
    if failures:
        if ctx.is_main:
            raise Settled(_naming(failures[0]))
        raise Elsewhere("reported by rank 0")


class Settled(RuntimeError):
    """Rank 0's report of another process's failed check."""


def _naming(failure) -> str:
    rank, kind, msg = failure
    return f"process {rank} of {_context.world_size}: {kind}: {msg}"


def settle(exc: BaseException) -> Optional[str]:
    """The error message this process prints for ``exc`` (None: another process reports it)."""
    import torch.distributed as dist
    if isinstance(exc, Elsewhere):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        # before the group: every process has the same command line and environment, rank 0 speaks for all
        return str(exc) if env_rank() == 0 or isinstance(exc, DistributedError) else None
    ctx = _context
    if _checking and not isinstance(exc, DistributedError):
        try:
            failures = [f for f in _exchange((ctx.rank, type(exc).__name__, str(exc))) if f is not None]
        except DistributedError as err:
            return str(err)
        if not ctx.is_main:
            return None
        return str(exc) if failures[0][0] == 0 else _naming(failures[0])
    if ctx.is_main or isinstance(exc, DistributedError):
        return str(exc)
    return f"{ctx.tag}{exc}"


# ----------------------------------------------------------------------------- data and collectives

def shard(n: int, ctx: Optional[Context] = None) -> range:
    """This process's contiguous share of n items (the shares in rank order are 0..n-1; sizes differ by <= 1)."""
    ctx = ctx or current()
    base, extra = divmod(n, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return range(start, start + base + (ctx.rank < extra))


def shard_of(ds, ctx: Optional[Context] = None):
    ctx = ctx or current()
    return torch.utils.data.Subset(ds, list(shard(len(ds), ctx))) if ctx.distributed else ds


def batch_share(idx: torch.Tensor, ctx: Optional[Context] = None):
    """(this process's indices of the global batch ``idx``, its loss weight N * n_r / n).

    With the weight, DistributedDataParallel's average of the gradients is the gradient of the global batch's
    mean loss. A process left without an image (a last batch shorter than N) takes the batch's first image
    with weight 0: it computes a zero gradient and still joins the all-reduce."""
    ctx = ctx or current()
    part = shard(len(idx), ctx)
    if len(part) == 0:
        return idx[:1], 0.0
    return idx[part.start:part.stop], ctx.world_size * len(part) / len(idx)


def global_means(value: float, parts: dict, weight: float, device, ctx: Optional[Context] = None):
    """The global batch's loss and parts from each process's (weight N * n_r / n): one all-reduce."""
    import torch.distributed as dist
    ctx = ctx or current()
    keys = list(parts)
    w = weight / ctx.world_size
    local = [value * w if weight else 0.0] + [parts[k] * w if weight else 0.0 for k in keys]
    t = torch.tensor(local, dtype=torch.float64, device=device)
    with collective("training step", ctx):
        dist.all_reduce(t)
    got = t.tolist()
    return got[0], dict(zip(keys, got[1:]))


def first_message(message: Optional[str], ctx: Optional[Context] = None) -> str:
    """Every process's message (None where it has none); the first, naming its process."""
    import torch.distributed as dist
    ctx = ctx or current()
    out = [None] * ctx.world_size
    with collective("training step", ctx):
        dist.all_gather_object(out, message, group=ctx.cpu_group)
    for rank, m in enumerate(out):
        if m is not None:
            return f"{m} (process {rank} of {ctx.world_size})"
    return "a non-finite loss (no process could name the term)"


def all_reduce_sum(tensors: list, count: int, ctx: Optional[Context] = None):
    """(the element-wise sums of ``tensors`` over the processes, the summed count)."""
    import torch.distributed as dist
    ctx = ctx or current()
    flat = torch.cat([t.reshape(-1).double().cpu() for t in tensors] + [torch.tensor([float(count)],
                                                                                     dtype=torch.float64)])
    with collective("reference memory", ctx):
        dist.all_reduce(flat, group=ctx.cpu_group)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].reshape(t.shape).to(t.dtype))
        i += t.numel()
    return out, int(flat[-1].item())


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def _counts(n: int, ctx: Context) -> list[int]:
    import torch.distributed as dist
    out = [None] * ctx.world_size
    dist.all_gather_object(out, n, group=ctx.cpu_group)
    return out


def all_gather_rows(t: torch.Tensor, what: str, ctx: Optional[Context] = None) -> torch.Tensor:
    """The rows of every process's CPU tensor, concatenated in rank order, on every process."""
    import torch.distributed as dist
    ctx = ctx or current()
    with collective(what, ctx):
        counts = _counts(t.shape[0], ctx)
        rows = max(counts)
        parts = [t.new_empty((rows, *t.shape[1:])) for _ in counts]
        dist.all_gather(parts, _padded(t, rows), group=ctx.cpu_group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def gather_rows(t: torch.Tensor, what: str, ctx: Optional[Context] = None) -> Optional[torch.Tensor]:
    """The rows of every process's CPU tensor, concatenated in rank order, on rank 0 (None elsewhere)."""
    import torch.distributed as dist
    ctx = ctx or current()
    with collective(what, ctx):
        counts = _counts(t.shape[0], ctx)
        rows = max(counts)
        parts = [t.new_empty((rows, *t.shape[1:])) for _ in counts] if ctx.is_main else None
        dist.gather(_padded(t, rows), parts, dst=0, group=ctx.cpu_group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]) if ctx.is_main else None


def gather_objects(obj, what: str, ctx: Optional[Context] = None, group=None) -> Optional[list]:
    """Every process's ``obj`` in rank order on rank 0 (None elsewhere)."""
    import torch.distributed as dist
    ctx = ctx or current()
    out = [None] * ctx.world_size if ctx.is_main else None
    with collective(what, ctx):
        dist.gather_object(obj, out, dst=0, group=group or ctx.cpu_group)
    return out


def patient_group(ctx: Optional[Context] = None):
    """A gloo group without a practical timeout, for waiting on processes that work alone for a long time
    (``fod benchmark``'s final gather). A process that dies still ends the wait at once (its connection closes)."""
    import torch.distributed as dist
    ctx = ctx or current()
    with collective("fod benchmark", ctx):
        return dist.new_group(backend="gloo", timeout=datetime.timedelta(days=30))


# ----------------------------------------------------------------------------- the model

class Levels(nn.Module):
    """The level models as one module: DistributedDataParallel wraps one module and one forward per step."""

    def __init__(self, models: nn.ModuleList):
        super().__init__()
        self.models = models

    def forward(self, feats, memories):
        return [m(f, mem) for f, m, mem in zip(feats, self.models, memories)]


def wrap(models: nn.ModuleList, device: str, find_unused: bool, ctx: Optional[Context] = None):
    """DistributedDataParallel over the level models (their parameters stay those of ``models``). Buffers are
    not broadcast: the only one, the position code, is a constant."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    ctx = ctx or current()
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else {"broadcast_buffers": False}  # the newer name (torch 2.14; broadcast_buffers is deprecated there)
    with collective("starting DistributedDataParallel", ctx):
        return DDP(Levels(models), device_ids=ids, find_unused_parameters=find_unused, **no_sync)


@contextmanager
def no_folder(path):
    """The stand-in for the output folder on the processes other than rank 0 (they never write)."""
    class _Stand:
        replacing, stage, in_place = False, None, set()

        def write_in_place(self, names):
            self.in_place = set(names)

        def commit(self):
            pass
    s = _Stand()
    s.path = path
    yield s
