"""Builds fod_kernels' C++ extensions against the installed torch.

    pip install --no-build-isolation -e .

--no-build-isolation: the extensions must link against the torch already
installed (an isolated build would fetch another, multi-GB torch and build
against it). Environment:
    FOD_BUILD_CUDA   auto (default: when torch is a CUDA build and nvcc is found) | 1 (force) | 0 (skip)
    FOD_CUDA_ARCH    e.g. "80;90" (default), or TORCH_CUDA_ARCH_LIST "8.0;9.0": SASS for each, PTX for the newest
    FOD_PTXAS_VERBOSE=1  print registers, stack frame and spills of every CUDA kernel (-Xptxas -v)
    FOD_CPU_ARCH     extra flags for every CPU kernel variant (the variants: _build_flags.CPU_VARIANTS)
    CUDA_HOME        the toolkit folder holding lib64/libcudart.so (e.g. /usr/local/cuda)
    MAX_JOBS         parallel compile jobs (ninja)
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_build_flags", ROOT / "fod_kernels" / "_build_flags.py")
flags = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flags)


def extensions():
    import torch
    from torch.utils import cpp_extension as ce

    inc = [str(ROOT / "csrc")]
    headers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh"))
    want = os.environ.get("FOD_BUILD_CUDA", "auto").lower()
    if want not in ("auto", "0", "1"):
        raise SystemExit(f"FOD_BUILD_CUDA must be auto, 0 or 1, got {want!r}")
    have_nvcc = ce.CUDA_HOME is not None and (Path(ce.CUDA_HOME) / "bin" / "nvcc").exists()
    reason = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    elif not have_nvcc:
        reason = f"no nvcc under CUDA_HOME={ce.CUDA_HOME!r}"
    if want == "1" and reason:
        raise SystemExit(f"FOD_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    exts = []
    for name, (sources, is_cuda) in flags.EXTENSIONS.items():
        srcs = [f"csrc/{s}" for s in sources]
        if not is_cuda:
            exts.append(ce.CppExtension(f"fod_kernels.{name}", srcs, include_dirs=inc, depends=headers,
                                        extra_compile_args={"cxx": flags.cpu_flags(flags.cpu_variant_of(name))},
                                        extra_link_args=flags.cpu_link_flags()))
        elif want == "0" or (want == "auto" and reason):
            print(f"fod_kernels: skipping the CUDA extension {name} ({reason or 'FOD_BUILD_CUDA=0'})")
        else:
            exts.append(ce.CUDAExtension(f"fod_kernels.{name}", srcs, include_dirs=inc, depends=headers,
                                         extra_compile_args={"cxx": ["-O3"], "nvcc": flags.cuda_flags()}))

    class BuildExt(ce.BuildExtension):
        """One object folder per extension: the CPU variants compile the same source with different flags."""

        def build_extension(self, ext):
            base = self.build_temp
            self.build_temp = os.path.join(base, ext.name)
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = base

    return exts, BuildExt.with_options(use_ninja=True)


exts, build_ext = extensions()
setup(ext_modules=exts, cmdclass={"build_ext": build_ext})
