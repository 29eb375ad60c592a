"""Several processes (fod.distributed, issue 14): torchrun with gloo on the CPU, 2 processes.

The runs are real torchrun launches (``python -m torch.distributed.run --standalone``) in subprocesses, on tiny
demo data (fod.synthetic, 48 px, resnet18 --no-pretrained, 2 epochs). 9 training images with a global batch of
4 (2 processes x 2): steps of 4, 4 and 1 images, so the last global batch leaves process 1 without an image.
Faults are injected by a wrapper script around ``fod.cli.main`` (a process kills itself, hangs, or fails a
check) so that nothing in the package exists for the tests' sake.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fod import checkpoint as C
from fod import distributed as D
from fod.cli import main
from fod.synthetic import make_dataset

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--backbone", "resnet18", "--levels", "layer1,layer2", "--no-pretrained", "--image-size", "48",
        "--d-model", "16,16", "--heads", "2", "--layers", "1", "--epochs", "2", "--lr", "1e-3",
        "--backend", "reference", "--device", "cpu", "--heatmaps", "0"]
LOSS_RTOL, METRIC_ATOL = 1e-4, 1e-3
METRICS = ("image_auroc", "pixel_auroc", "aupro")

FAULTS = textwrap.dedent('''
    """torchrun entry point for the tests: fod.cli.main with a fault injected on one process (FOD_TEST_FAULT:
    kill:RANK:STEP, hang:RANK:STEP (counting training steps over the epochs) or check:RANK)."""
    import os, signal, sys, time
    import fod.distributed as D
    kind, rank, step = (os.environ.get("FOD_TEST_FAULT", "none:-1") + ":0").split(":")[:3]
    rank, step, me = int(rank), int(step), int(os.environ["RANK"])
    if kind in ("kill", "hang") and me == rank:
        global_means, count = D.global_means, [0]
        def fault(*args, **kw):
            count[0] += 1
            if count[0] == step:
                if kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(600)
            return global_means(*args, **kw)
        D.global_means = fault
    elif kind == "check" and me == rank:
        import fod.train
        def fingerprint(ds):
            raise FileNotFoundError(f"injected: process {me} cannot read the training images")
        fod.train.data_fingerprint = fingerprint
    from fod.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "FOD_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.update(extra)
    return env


def _fod(*args) -> int:
    """fod in one plain process: this one (no start-up cost; the one_thread fixture keeps it at one thread)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-init warning
        return main([str(a) for a in args])


def _torchrun(*args, nproc=2, script=None, timeout=300, **env):
    """fod (or the fault wrapper ``script``) under torchrun with ``nproc`` processes."""
    target = [str(script)] if script else ["-m", "fod"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *target,
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(**env), cwd=ROOT)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _errors(proc) -> list[str]:
    return [line[line.index("fod "):] for line in proc.stderr.splitlines() if "fod train: error:" in line
            or "fod test: error:" in line or "fod demo: error:" in line]


def _metrics(run) -> dict:
    return json.loads((Path(run) / "metrics.json").read_text())


def _assert_same_run(a: dict, b: dict):
    """Per-epoch losses (relative 1e-4) and metrics (absolute 1e-3) of two runs."""
    assert len(a["history"]) == len(b["history"])
    for ha, hb in zip(a["history"], b["history"]):
        for k in ("loss", "rec", "k_intra", "k_inter"):
            assert abs(ha[k] - hb[k]) <= LOSS_RTOL * abs(ha[k]), (ha["epoch"], k, ha[k], hb[k])
    for k in METRICS:
        assert abs(a[k] - b[k]) <= METRIC_ATOL, (k, a[k], b[k])
    # the decision thresholds, set on the same held-out images (rank 0 scores them)
    ca, cb = a["calibration"], b["calibration"]
    assert ca["held_out"] == cb["held_out"] and ca["images"] == cb["images"] > 0
    for k in ("image_threshold", "pixel_threshold"):
        assert abs(ca[k] - cb[k]) <= 1e-3 * abs(ca[k]), (k, ca[k], cb[k])


def _weights(run) -> dict:
    return C.load_raw(Path(run) / "checkpoint.pt")["models"]


def _assert_same_weights(a: dict, b: dict, atol=1e-5):
    """The level models' weights. The key biases are left out: attention is invariant to them (a shift of
    every key score), so their gradient is zero up to rounding, and Adam's normalised step turns rounding
    noise into steps of size lr: they differ between any two non-bitwise-equal runs and change no output."""
    assert a.keys() == b.keys()
    compared = [k for k in a if not k.endswith("_k.bias")]
    assert len(compared) > 20
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in compared)
    assert worst <= atol, worst


# The single-process runs in this process use one thread, as each torchrun process does.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(category):
    # 10 training images: 1 held out to calibrate (--val-fraction 0.1), 9 train: 3 steps of 4 per epoch, so the
    # fault at step 5 falls in epoch 2
    return category(size=48, n_test_good=3, n_test_defect=2)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """A single-process run with batch 4 and a 2-process run with batch 2 per process, same seed."""
    base = tmp_path_factory.mktemp("dist")
    one, two = base / "one", base / "two"
    assert _fod("train", "--data", data, "--output", one, *TINY, "--batch-size", 4) == 0
    proc = _ok(_torchrun("train", "--data", data, "--output", two, *TINY, "--batch-size", 2))
    return one, two, proc


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "faults.py"
    path.write_text(FAULTS)
    return path


# ----------------------------------------------------------------------------- pure helpers

@given(n=st.integers(0, 50), world=st.integers(1, 8))
def test_shards_partition_in_order(n, world):
    shards = [D.shard(n, D.Context(rank=r, world_size=world)) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@given(size=st.integers(1, 40), world=st.integers(1, 8), seed=st.integers(0, 1000))
def test_batch_share_weights_give_the_global_mean(size, world, seed):
    """The processes' parts of a global batch, in rank order, are the batch; DDP's average of the weighted
    gradients sum_r w_r * mean_r / N equals the batch mean (checked on per-sample values); an empty part is
    a stand-in image of weight 0."""
    idx = torch.randperm(100, generator=torch.Generator().manual_seed(seed))[:size]
    values = torch.rand(100, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    parts = [D.batch_share(idx, D.Context(rank=r, world_size=world)) for r in range(world)]
    real = [(p, w) for p, w in parts if w > 0]
    assert torch.equal(torch.cat([p for p, _ in real]), idx)
    assert all(len(p) == 1 and w == 0 for p, w in parts if w == 0)
    ddp_mean = sum(w * values[p].mean() for p, w in parts) / world
    assert torch.allclose(ddp_mean, values[idx].mean())


def test_timeout_setting(monkeypatch):
    monkeypatch.delenv(D.TIMEOUT_ENV, raising=False)
    assert D.timeout_seconds() == D.DEFAULT_TIMEOUT
    monkeypatch.setenv(D.TIMEOUT_ENV, "12.5")
    assert D.timeout_seconds() == 12.5
    for bad in ("0", "-3", "soon", "inf", "nan"):
        monkeypatch.setenv(D.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=D.TIMEOUT_ENV):
            D.timeout_seconds()


# ----------------------------------------------------------------------------- torchrun, 2 processes

def test_two_processes_equal_one_with_the_global_batch(runs):
    one, two, proc = runs
    a, b = _metrics(one), _metrics(two)
    _assert_same_run(a, b)
    assert (a["world_size"], a["global_batch_size"]) == (1, 4)
    assert (b["world_size"], b["global_batch_size"]) == (2, 4) and b["config"]["batch_size"] == 2
    ck = C.load_raw(two / "checkpoint.pt")
    assert (ck["world_size"], ck["global_batch_size"]) == (2, 4)
    ref = C.load_raw(one / "checkpoint.pt")
    for m1, m2 in zip(ref["memory"], ck["memory"]):  # the reference memory over both processes' shards
        torch.testing.assert_close(m1, m2, rtol=1e-5, atol=1e-6)
    _assert_same_weights(ref["models"], ck["models"])
    # rank 0 alone wrote the outputs and logged: one set of epoch lines
    assert sorted(p.name for p in two.iterdir() if p.name != ".fod-manifest.json") == [
        "checkpoint.pt", "config.toml", "log.csv", "metrics.json", "summary.png", "tensorboard"]
    assert proc.stderr.count("epoch 2/2: loss") == 1


def test_fod_test_under_torchrun(runs, data, tmp_path):
    """fod test of the 2-process run's checkpoint on 2 processes (3 images each per batch: other shards and
    batches than in training) gives the metrics of that run's own final evaluation."""
    _, two, _ = runs
    out = tmp_path / "test"
    _ok(_torchrun("test", "--data", data, "--checkpoint", two / "checkpoint.pt", "--output", out, "--batch-size", 3,
                  "--heatmaps", "0"))
    a, b = _metrics(two), _metrics(out)
    for k in METRICS:
        assert abs(a[k] - b[k]) <= METRIC_ATOL, k
    assert b["world_size"] == 2


def test_killed_process_ends_the_run_and_resume_on_one_process(runs, data, faults, tmp_path, capsys):
    """Process 1 dies (SIGKILL) in epoch 2: the run ends at once with a clear error and keeps epoch 1's
    checkpoint; --resume on ONE process (batch 4: the same global batch) ends where the uninterrupted
    2-process run ended."""
    _, two, _ = runs
    out = tmp_path / "killed"
    # a collective timeout far beyond the launch's own (a hang fails the test with TimeoutExpired): the run
    # must end because the loss of the process is noticed, not because a collective timed out
    proc = _torchrun("train", "--data", data, "--output", out, *TINY, "--batch-size", 2, script=faults,
                     FOD_TEST_FAULT="kill:1:5", FOD_DIST_TIMEOUT="3600", timeout=300)
    assert proc.returncode != 0
    errors = _errors(proc)
    assert any("[rank 0 of 2]" in e and "lost another process of the run" in e for e in errors) or any(
        "stopped by torchrun" in e for e in errors), proc.stderr[-3000:]
    assert any("keeps the last good model (epoch 1; --resume continues from it)" in e for e in errors), errors
    assert C.load_raw(out / "checkpoint.pt")["epoch"] == 1
    # a different global batch is refused, naming the one to use
    assert _fod("train", "--data", data, "--output", out, *TINY, "--batch-size", 2, "--resume") == 2
    err = capsys.readouterr().err
    assert "global batch of 4 (2 process(es) x 2); keep the global batch: --batch-size 4" in err, err
    assert _fod("train", "--data", data, "--output", out, *TINY, "--batch-size", 4, "--resume") == 0
    resumed = _metrics(out)
    _assert_same_run(_metrics(two), resumed)
    assert resumed["world_size"] == 1 and resumed["global_batch_size"] == 4
    _assert_same_weights(_weights(two), _weights(out))


def test_hanging_process_times_out(data, faults, tmp_path):
    """Process 1 stops answering (for 10 minutes): process 0 gives up after FOD_DIST_TIMEOUT seconds and says
    so (without the timeout the launch would outlast its own limit and fail the test)."""
    proc = _torchrun("train", "--data", data, "--output", tmp_path / "hung", *TINY, "--batch-size", 2,
                     script=faults, FOD_TEST_FAULT="hang:1:2", FOD_DIST_TIMEOUT="4", timeout=300)
    assert proc.returncode != 0
    errors = _errors(proc)
    assert any(e.startswith("fod train: error: [rank 0 of 2] training step: lost another process") and
               "did not answer within 4 s" in e for e in errors), proc.stderr[-3000:]


def test_check_failures_are_reported_once(data, faults, tmp_path):
    """An error every process hits is printed once (by rank 0); one that a single process hits is printed
    once too, by rank 0 naming that process; nothing is written."""
    proc = _torchrun("train", "--data", tmp_path / "nowhere", "--output", tmp_path / "x", *TINY)
    assert proc.returncode != 0
    errors = _errors(proc)
    assert len(errors) == 1 and "not found" in errors[0] and str(tmp_path / "nowhere") in errors[0], proc.stderr
    out = tmp_path / "check"
    proc = _torchrun("train", "--data", data, "--output", out, *TINY, "--batch-size", 2, script=faults,
                     FOD_TEST_FAULT="check:1")
    assert proc.returncode != 0
    assert _errors(proc) == ["fod train: error: process 1 of 2: FileNotFoundError: injected: process 1 cannot "
                             "read the training images"], proc.stderr[-3000:]
    assert not out.exists()


def test_benchmark_spreads_categories_over_processes(tmp_path):
    """fod benchmark under torchrun: each process runs whole categories as single-process runs; rank 0 writes
    the results of all of them, equal to a single-process benchmark's."""
    root = tmp_path / "root"
    for i, c in enumerate(("aa", "bb")):
        make_dataset(root / c, size=48, n_train=5, n_test_good=2, n_test_defect=1, seed=i)
    opts = [*TINY, "--epochs", "1", "--batch-size", "2"]
    assert _fod("benchmark", "--data", root, "--output", tmp_path / "one", *opts) == 0
    proc = _ok(_torchrun("benchmark", "--data", root, "--output", tmp_path / "two", *opts))
    assert "[rank 1 of 2] categories bb" in proc.stderr
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert [r["category"] for r in two] == ["aa", "bb", "mean"]
    for a, b in zip(one, two):
        assert b["status"] == "ok"
        for k in METRICS:
            assert abs(a[k] - b[k]) <= 1e-9, (a["category"], k)
    assert "2 torchrun processes" in (tmp_path / "two" / "results.md").read_text()
