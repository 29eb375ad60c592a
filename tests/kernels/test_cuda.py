"""The "cuda" backend (csrc/cuda, extension fod_kernels._C_cuda): availability and the built extension.

Without a CUDA device status() must give a clear reason and an explicit backend="cuda" must raise it, never
fall back; the built extension's kernels must not spill. The kernels themselves are tested in their CPU
simulation (test_cuda_sim.py) and on a GPU (test_cuda_gpu.py).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fod_kernels as fk
from fod_kernels import backend_cuda
from helpers import make_branch


# ---------------------------------------------------------------------------------------------
# Availability: runs everywhere.
# ---------------------------------------------------------------------------------------------
def test_status_gives_a_clear_reason():
    ok, why = backend_cuda.status()
    assert isinstance(ok, bool) and isinstance(why, str) and why
    if not torch.cuda.is_available():
        assert not ok, "the cuda backend must not claim to run without a CUDA device"
        assert ("not importable" in why and "_C_cuda" in why) or "no CUDA device" in why, why
    elif not ok:
        assert "_C_cuda" in why, why
    assert fk.available_backends()["cuda"] == (ok, why)


def test_supports_only_cuda_tensors():
    ok, why = backend_cuda.supports_device(torch.device("cpu"))
    assert not ok and "CUDA tensors" in why
    assert backend_cuda.supports_device(torch.device("cuda", 0)) == (True, "")


def test_explicit_backend_raises_never_falls_back():
    ok, why = backend_cuda.status()
    branch = make_branch(1, 1, 16, 8, 1)
    expected = why if not ok else "cannot run on cpu"  # on a GPU machine these are CPU tensors
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        fk.correlation_attention(*branch, (4, 4), backend="cuda")
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        fk.i2correlation(*branch, *branch, (4, 4), backend="cuda")


def test_kernel_functions_raise_the_reason_when_unbuilt():
    ok, why = backend_cuda.status()
    if ok or "not importable" not in why:
        pytest.skip("the extension is built here")
    q, k, v, s = make_branch(1, 1, 4, 8, 1)
    with pytest.raises(RuntimeError, match=re.escape(why)):
        backend_cuda.fwd([q], [k], [v], [s], 2, 2, 0.5, 1e-4, [True])


def _cuobjdump():
    import os
    cands = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump", shutil.which("cuobjdump")]
    try:
        import triton
        cands.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in cands if c and Path(c).is_file()), None)


def test_built_cuda_kernels_do_not_spill_and_carry_ptx():
    """The built extension (no GPU needed to inspect it): every kernel of every architecture has no stack
    frame and no local memory (no register spills), and the fat binary carries PTX for the newest
    architecture it was built for, so that newer GPUs can JIT-compile it. Build with FOD_PTXAS_VERBOSE=1
    to see ptxas's own -v report in the build log."""
    from fod_kernels import _ext
    mod, why = _ext.load("_C_cuda")
    if mod is None:
        pytest.skip(f"the CUDA extension is not built here: {why}")
    exe = _cuobjdump()
    if exe is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton) to read the extension's resource usage")
    usage = subprocess.run([exe, "-res-usage", mod.__file__], capture_output=True, text=True, check=True).stdout
    kernels = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert len(kernels) >= 27, usage[:2000]  # 3 dtypes x (logz + 3 head-dim buckets x 3 kernels - shared) per arch
    spilling = [(name, regs, stack, local) for name, regs, stack, local in kernels if int(stack) or int(local)]
    assert not spilling, spilling
    listing = subprocess.run([exe, "-lelf", "-lptx", mod.__file__], capture_output=True, text=True).stdout
    sass = sorted({int(a) for a in re.findall(r"\.sm_(\d+)a?\.cubin", listing)})
    ptx = sorted({int(a) for a in re.findall(r"\.sm_(\d+)a?\.ptx", listing)})
    assert sass and ptx and max(ptx) == max(sass), listing
