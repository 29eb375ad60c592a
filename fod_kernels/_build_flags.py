"""Compiler flags shared by setup.py and the JIT build. No package imports here."""
from __future__ import annotations

import os
import platform


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
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]  # no -std: torch picks its own (C++20 from 2.13)
    arch = os.environ.get("FOD_CPU_ARCH")
    if arch is not None:
        flags += arch.split()
    elif platform.machine() in ("x86_64", "AMD64") and _cpu_has("avx2", "fma"):
        flags += ["-mavx2", "-mfma"]
    return flags


def cpu_link_flags() -> list[str]:
    return ["-fopenmp"]  # resolves to the libgomp that torch itself loads (same soname)


def cuda_arch_flags() -> list[str]:
    """-gencode flags from FOD_CUDA_ARCH (e.g. "80;90"), else TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0"),
    else sm_80 and sm_90."""
    archs = os.environ.get("FOD_CUDA_ARCH") or os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace("+PTX", "") or "80;90"
    archs = archs.replace(" ", ";")
    out = []
    for a in archs.replace(",", ";").split(";"):
        a = a.strip().replace(".", "")
        if a:
            out += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return out


def cuda_flags() -> list[str]:
    return ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + cuda_arch_flags()
