"""The extensions, their sources and compiler flags, shared by setup.py and the JIT build
(fod_kernels._ext.jit_build). No package imports here: setup.py loads this file on its own."""
from __future__ import annotations

import os
import platform

# name -> (sources relative to csrc/, is_cuda). The only list of extension sources.
EXTENSIONS = {
    "_C": (["cpu/i2corr_cpu.cpp"], False),
    "_C_cuda": (["cuda/i2corr_cuda.cu", "cuda/bindings.cpp"], True),
}


def _cpu_has(*flags: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return False
    words = set(info.split())
    return all(fl in words for fl in flags)


def cpu_flags() -> list[str]:
    """-O3, OpenMP SIMD pragmas (vectorised reductions without -ffast-math), and AVX2/FMA
    when the build machine has them (FOD_CPU_ARCH overrides, e.g. "" or "-march=x86-64-v3")."""
    # -fopenmp: at::parallel_for is header code; without it an extension runs it on one thread.
    # No -std: torch picks its own (C++17 up to 2.12, C++20 from 2.13); the sources build as both.
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    arch = os.environ.get("FOD_CPU_ARCH")
    if arch is not None:
        flags += arch.split()
    elif platform.machine() in ("x86_64", "AMD64") and _cpu_has("avx2", "fma"):
        flags += ["-mavx2", "-mfma"]
    return flags


def cpu_link_flags() -> list[str]:
    return ["-fopenmp"]  # resolves to the libgomp that torch itself loads (same soname)


def cuda_archs() -> list[str]:
    """Compute capabilities to build for, e.g. ["80", "90"]: FOD_CUDA_ARCH (e.g. "80;90"), else
    TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0+PTX"), else sm_80 and sm_90."""
    archs = os.environ.get("FOD_CUDA_ARCH") or os.environ.get("TORCH_CUDA_ARCH_LIST", "") or "80;90"
    out = []
    for a in archs.replace(" ", ";").replace(",", ";").split(";"):
        a = a.strip().replace("+PTX", "").replace(".", "")
        if a and a not in out:
            out.append(a)
    return out


def cuda_arch_flags() -> list[str]:
    """-gencode flags: machine code (SASS) for every listed architecture, and PTX for the newest one,
    so that a newer GPU than any listed can still JIT-compile the kernels."""
    archs = cuda_archs()
    out = []
    for a in archs:
        out += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    # Portable PTX: without an arch-specific suffix ("90a" code runs on sm_90 only).
    newest = max(int("".join(c for c in a if c.isdigit())) for a in archs)
    out += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return out


def cuda_flags() -> list[str]:
    """nvcc flags. FOD_PTXAS_VERBOSE=1 adds -Xptxas -v (registers, stack frame and spills per kernel)."""
    flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + cuda_arch_flags()
    if os.environ.get("FOD_PTXAS_VERBOSE") == "1":
        flags += ["-Xptxas", "-v"]
    return flags
