"""Test session set-up. Triton runs on the CPU under its interpreter when no GPU is present;
the variable must be set before triton is first imported, hence here.

Hypothesis profiles (HYPOTHESIS_PROFILE=<name>, default "ci"; see docs/MUTATION.md):
  ci    deterministic (derandomize=True): the same examples on every run, so a failure found once is found
        every time, and CI is reproducible. Each test's own max_examples applies.
  gpu   the GPU machine's runs: randomised, each test's own max_examples.
  long  local bug hunting: randomised, and every test's example budget (its own max_examples, or the default)
        multiplied by HYPOTHESIS_LONG_FACTOR (default 10). Slow: run a file or a test at a time.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
LONG_FACTOR = int(os.environ.get("HYPOTHESIS_LONG_FACTOR", "10"))
settings.register_profile("ci", deadline=None, print_blob=True, derandomize=True)
settings.register_profile("gpu", deadline=None, print_blob=True)
settings.register_profile("long", deadline=None, print_blob=True, derandomize=False,
                          max_examples=settings.default.max_examples * LONG_FACTOR)
if PROFILE not in ("ci", "gpu", "long"):
    raise pytest.UsageError(f"HYPOTHESIS_PROFILE={PROFILE!r}: choose ci, gpu or long")
settings.load_profile(PROFILE)


@pytest.fixture(scope="module")
def one_torch_thread():
    """FOD_THREADS=1 for the runs of a module (fod sets torch's thread count from it), restored afterwards.
    Modules take it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``: it is then set up before
    their other module fixtures."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FOD_THREADS", "1")
        yield
    torch.set_num_threads(threads)


def _scale_examples(item):
    """Under the long profile, multiply a test's own @settings(max_examples=N) too (it overrides the profile)."""
    fn = getattr(item, "obj", None)
    own = getattr(fn, "_hypothesis_internal_use_settings", None)  # Hypothesis' per-test settings
    if own is None or getattr(fn, "_fod_long_scaled", False):  # not a hypothesis test, or done (parametrised)
        return
    if own.max_examples < settings.default.max_examples:
        fn._hypothesis_internal_use_settings = settings(own, max_examples=own.max_examples * LONG_FACTOR)
    fn._fod_long_scaled = True


def pytest_collection_modifyitems(config, items):
    if PROFILE == "long":
        for item in items:
            _scale_examples(item)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
