"""The extensions, their sources and compiler flags, shared by setup.py and the JIT build
(fod_kernels._ext.jit_build). No package imports here: setup.py loads this file on its own."""
from __future__ import annotations

import os
import platform

_X86 = platform.machine() in ("x86_64", "AMD64")

# The CPU kernels are compiled once per instruction-set variant, as ATen compiles its kernels: the same source
# with the variant's flags into its own extension module, of which fod_kernels.backend_cpu imports the one it
# picks at load (the widest the CPU runs, or FOD_CPU_CAPABILITY). A module of a variant the CPU cannot run is
# never imported. name -> (extension module, flags). "default" is portable and always built.
CPU_VARIANTS = {"default": ("_C", [])}
if _X86:
    CPU_VARIANTS["avx2"] = ("_C_avx2", ["-mavx2", "-mfma"])
    # ATen's AVX512 set (F, BW, VL, DQ + FMA); 512-bit vectors (GCC otherwise prefers 256 bits for many -mtunes).
    CPU_VARIANTS["avx512"] = ("_C_avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2",
                                            "-mfma", "-mprefer-vector-width=512"])

# name -> (sources relative to csrc/, is_cuda). The only list of extension sources.
EXTENSIONS = {ext: (["cpu/i2corr_cpu.cpp"], False) for ext, _ in CPU_VARIANTS.values()}
EXTENSIONS["_C_cuda"] = (["cuda/i2corr_cuda.cu", "cuda/bindings.cpp"], True)


def cpu_variant_of(ext: str) -> str:
    """The CPU variant an extension module holds ("default" for _C)."""
    return next(v for v, (e, _) in CPU_VARIANTS.items() if e == ext)


def cpu_flags(variant: str = "default") -> list[str]:
    """-O3, OpenMP SIMD pragmas (vectorised reductions without -ffast-math) and the variant's instruction
    set; FOD_CPU_ARCH adds flags to every variant (e.g. "-mtune=native")."""
    # -fopenmp: at::parallel_for is header code; without it an extension runs it on one thread.
    # No -std: torch picks its own (C++17 up to 2.12, C++20 from 2.13); the sources build as both.
    # FOD_CPU_VARIANT: the variant's name inside the module (its VARIANT attribute, checked at load).
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", f"-DFOD_CPU_VARIANT={variant}"]
    return flags + CPU_VARIANTS[variant][1] + os.environ.get("FOD_CPU_ARCH", "").split()


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
